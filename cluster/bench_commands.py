"""`ringpipe bench ...` subcommands; the benchmark code itself lives in tools/."""
from __future__ import annotations

from cluster.cli import bench  # noqa: F401  (subcommands attach to this group)

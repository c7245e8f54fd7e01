"""metrics.jsonl: the one JSON row per step that `ringpipe train` writes into its run directory.

Its "step" is the 1-based step number the progress line shows (after that many updates); a resumed
or restarted run keeps the rows up to the step it resumes from and appends its own.
"""
from __future__ import annotations

import json
import math
import os

from ringpipe.model.training.run_dir import METRICS_FILE
from ringpipe.runtime.files import AppendLog, write_text
from ringpipe.tools.trace_io import read_metrics


def open_metrics(out: str, first_step: int) -> AppendLog:
    """metrics.jsonl opened for appending; on resume, lines of steps not kept are dropped."""
    path = os.path.join(out, METRICS_FILE)
    kept = []
    if first_step > 0 and os.path.exists(path):
        # Rows are renumbered from 1 when the file predates 1-based step numbers.
        kept = [json_line(row) for row in read_metrics(out) if row.get("step", 0) <= first_step]
    write_text(path, "".join(kept))
    return AppendLog(path)


def json_line(row: dict) -> str:
    """One metrics.jsonl line. A non-finite value (a skipped step's loss) is written as null: bare
    NaN/Infinity are not JSON, and strict readers (jq, JavaScript) reject the whole file."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in row.items()}
    return json.dumps(clean, allow_nan=False) + "\n"

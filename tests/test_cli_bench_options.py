"""The model-shape flags that several `ringpipe bench` commands share (one decorator,
cluster/bench_commands.py): each command keeps its own defaults and its own order in `--help`, and
every one of them is a positive integer."""
import re

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main

# Each command's shape flags in its `--help` order, with its defaults (as they were when each
# command spelled its own options out).
SHAPES = {
    "model": [("--n-layer", 4), ("--n-head", 4), ("--n-embd", 128), ("--block-size", 64), ("--batch-size", 12),
              ("--vocab-size", 65)],
    "gpu-step": [("--n-layer", 12), ("--n-head", 12), ("--n-embd", 768), ("--block-size", 1024),
                 ("--vocab-size", 50257), ("--batch-size", 8)],
    "data-parallel": [("--n-layer", 4), ("--n-head", 4), ("--n-embd", 128), ("--block-size", 64)],
    "pipeline": [("--n-layer", 4), ("--n-head", 8), ("--n-embd", 256), ("--block-size", 128)],
    "generate": [("--n-layer", 8), ("--n-head", 8), ("--n-embd", 256), ("--block-size", 128), ("--vocab-size", 8192)],
}
SHAPE_FLAGS = {flag for flags in SHAPES.values() for flag, _ in flags}


@pytest.mark.parametrize("command", sorted(SHAPES))
def test_each_bench_command_lists_its_shape_flags_in_its_order_with_its_defaults(command):
    result = CliRunner().invoke(main, ["bench", command, "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    listed = [(flag, int(default)) for flag, default in
              re.findall(r"^\s+(--[a-z-]+) INTEGER RANGE\s+\[default: (\d+); x>=1\]$", result.output, re.M)
              if flag in SHAPE_FLAGS]
    assert listed == SHAPES[command], result.output


def test_the_defaults_reach_the_command_and_zero_is_refused():
    command = main.commands["bench"].commands["gpu-step"]
    defaults = {param.name: param.default for param in command.params}
    assert {name: defaults[name] for name in ("n_layer", "vocab_size", "batch_size")} == {
        "n_layer": 12, "vocab_size": 50257, "batch_size": 8}
    result = CliRunner().invoke(main, ["bench", "gpu-step", "--batch-size", "0"])
    assert result.exit_code == 2 and "'--batch-size'" in result.output, result.output

"""Non-finite numbers: flags refuse them; a nan/inf loss or gradient norm stops the run naming the step
(or skips the step with --on-nonfinite skip), on one process and across workers; good checkpoints stay."""
import json

import click
import numpy as np
import pytest

from ringpipe.cluster.cli import main
from ringpipe.cluster.options import FiniteFloat
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import find_checkpoint, saved_step
from ringpipe.model.training.sharded_checkpoint import is_sharded, load_consolidated
from ringpipe.runtime.files import load_tensors
from tests.conftest import one_error_line, run_cli

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--eval-every", "0"]
# An absurd learning rate: step 1 is finite, then the weights overflow float32 and the loss is nan.
EXPLODING = ["--lr", "1e30", "--min-lr", "1e30", "--warmup", "0"]


def all_commands(group, prefix=()):
    for name in group.list_commands(None):  # loads the lazily registered commands too
        command = group.get_command(None, name)
        if isinstance(command, click.Group):
            yield from all_commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_float_flag_of_every_command_refuses_non_finite_numbers():
    float_flags = [(path, param) for path, command in all_commands(main) for param in command.params
                   if isinstance(param.type, (click.types.FloatParamType, click.FloatRange))]
    assert {path for path, _ in float_flags} >= {("train",), ("generate",)}
    assert [(path, param.name) for path, param in float_flags if not isinstance(param.type, FiniteFloat)] == []


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--min-lr", "-inf"),
                                         ("--grad-clip", "NaN"), ("--bucket-mb", "inf")])
def test_train_refuses_a_non_finite_flag_in_one_line(tmp_path, corpus, flag, value):
    out = tmp_path / "run"
    line = one_error_line(run_cli("train", "--data", corpus, *TINY, flag, value, "--out", out))
    assert flag in line and "not a finite number" in line
    assert not out.exists()


def test_generate_refuses_a_non_finite_temperature(tmp_path):
    line = one_error_line(run_cli("generate", "--checkpoint", tmp_path, "--temperature", "nan"))
    assert "--temperature" in line


def test_a_config_with_a_non_finite_setting_is_invalid():
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig(lr=float("nan")).validate()


def checkpoint_step(out) -> int:
    return saved_step(str(out))


def checkpoint_arrays(out) -> tuple[dict, dict]:
    """(weights, optimizer state) of the run's checkpoint, consolidated or sharded (multi-worker)."""
    checkpoint = find_checkpoint(str(out))
    if is_sharded(checkpoint):
        _, tensors, optimizer = load_consolidated(checkpoint)
        return tensors, optimizer
    return load_tensors(out / "checkpoint" / "model.safetensors")[0], load_tensors(
        out / "checkpoint" / "optimizer.safetensors")[0]


def assert_finite_checkpoint(out):
    tensors, optimizer = checkpoint_arrays(out)
    for name, array in {**tensors, **optimizer}.items():
        assert np.isfinite(array).all(), name


def _not_json(constant):
    raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")


@pytest.mark.parametrize("layout", [[], ["--nproc", "2", "--dp", "2"], ["--nproc", "2", "--pp", "2", "--n-layer", "2"]],
                         ids=["single-process", "dp2", "pp2"])
@pytest.mark.timeout(120)
def test_a_non_finite_step_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, corpus, layout):
    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, *TINY, *EXPLODING, "--steps", 6, "--checkpoint-every", 1,
                     "--out", out, *layout)
    line = one_error_line(result)
    assert "step 2: loss nan" in line and "not finite" in line and "--on-nonfinite skip" in line, line
    assert "checkpoint of step 1" in line and "--resume" in line
    assert checkpoint_step(out) == 1
    assert_finite_checkpoint(out)
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("layout", [[], ["--nproc", "2", "--dp", "2", "--zero", "1"]], ids=["single-process", "dp2-zero1"])
@pytest.mark.timeout(120)
def test_on_nonfinite_skip_leaves_the_weights_of_skipped_steps_unchanged(tmp_path, corpus, layout):
    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, *TINY, *EXPLODING, "--steps", 3, "--checkpoint-every", 1,
                     "--on-nonfinite", "skip", "--out", out, *layout)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line, parse_constant=_not_json) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped", False) for m in metrics] == [False, True, True]
    assert metrics[1]["loss"] is None  # a skipped step's non-finite loss is JSON null, not a bare NaN
    assert checkpoint_step(out) == 3
    assert_finite_checkpoint(out)
    _, optimizer = checkpoint_arrays(out)
    assert int(optimizer["step"]) == 1  # only the first step was applied, on every rank alike
    assert np.isfinite(GPT.from_pretrained(out).params["wte.weight"]).all()


def test_weights_that_overflowed_in_an_update_are_never_written(tmp_path, corpus):
    # 1e39 is finite as a flag but overflows float32 in the update: step 1's loss and gradients
    # were finite, the weights after it are not.
    out = tmp_path / "run"
    line = one_error_line(run_cli("train", "--data", corpus, *TINY, "--dtype", "float32", "--lr", "1e39",
                                  "--warmup", "0", "--steps", 3, "--checkpoint-every", 1, "--out", out))
    assert "step 1: parameter" in line and "not finite" in line and "no checkpoint was written yet" in line, line
    assert not (out / "checkpoint").exists() and not (out / "model.safetensors").exists()

"""`ringpipe export` and `ringpipe quantize` never write their model into a run's own files: an
--out that is, or lies inside, another run directory, or that is RUN_DIR's checkpoint/, is one
error line (exit 2) and nothing is written."""
import os

import pytest

from tests.conftest import one_error_line, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ringpipe.model.training.trainer import Trainer
    from tests.test_sharded_checkpoint import tiny_config

    root = tmp_path_factory.mktemp("runs")
    for name in ("run", "other"):
        trainer = Trainer.create(tiny_config(root), str(root / name))
        trainer.train_step(0)
        trainer.save_checkpoint()
    return root


def _tree(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(root) for f in files)


COMMANDS = {"export": ["export", "{run}", "--out", "{out}"],
            "quantize": ["quantize", "{run}", "--int8", "--out", "{out}"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("out,named", [
    ("other", "is another run's directory"),
    ("other/checkpoint", "is inside another run's directory"),
    ("other/new", "is inside another run's directory"),
    ("run/checkpoint", "'s checkpoint/, which only training writes"),
    ("run/checkpoints/step-00000001", "inside {run}'s checkpoints/"),
])
def test_an_out_in_a_runs_own_files_is_refused_and_nothing_is_written(runs, command, out, named):
    before = _tree(runs)
    run, target = runs / "run", runs / out
    result = run_cli(*[a.format(run=run, out=target) for a in COMMANDS[command]])
    line = one_error_line(result)
    assert result.exit_code == 2 and line.startswith("Error: Invalid value for --out"), result.output
    assert named.format(run=run) in line, line
    assert _tree(runs) == before


def test_an_out_in_a_new_directory_of_its_own_run_is_allowed(runs, tmp_path):
    result = run_cli("export", runs / "run", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "model.safetensors").exists()

"""What `train --resume` may change: where its corpus is, not what it holds (the run keeps --data as an
absolute path, so a resume from another directory finds it); --steps, with a note that the learning-rate
schedule is recomputed for the new total."""
import os
import shutil

import pytest

from tests.conftest import TEXT, one_error_line, run_cli

TINY = ["--n-layer", 1, "--n-head", 1, "--n-embd", 8, "--block-size", 8, "--batch-size", 2, "--eval-iters", 1,
        "--eval-every", 0, "--warmup", 1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step run of a tiny model, its --data given relative to the directory it started in."""
    base = tmp_path_factory.mktemp("resume")
    (base / "corpus.txt").write_text(TEXT)
    (base / "other.txt").write_text("".join(reversed(TEXT.splitlines(True))))  # the same characters
    cwd = os.getcwd()
    os.chdir(base)
    try:
        result = run_cli("train", "--data", "corpus.txt", *TINY, "--steps", 1, "--out", "run")
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return base


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def test_a_run_stores_its_data_as_an_absolute_path(trained):
    from ringpipe.model.training.run_dir import saved_config

    assert saved_config(str(trained / "run")).data == str(trained / "corpus.txt")


@pytest.mark.timeout(120)
def test_resume_from_another_directory_finds_the_runs_corpus(run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    result = run_cli("train", "--resume", "--out", run_copy, "--steps", 2)
    assert result.exit_code == 0, result.output


def test_resume_refuses_a_corpus_with_other_text(trained, run_copy):
    tokens = (run_copy / "tokens.bin").read_bytes()
    result = run_cli("train", "--resume", "--out", run_copy, "--data", trained / "other.txt", "--steps", 2)
    line = one_error_line(result)
    assert "--data" in line and "other.txt" in line and "holds other text" in line, line
    assert (run_copy / "tokens.bin").read_bytes() == tokens


@pytest.mark.timeout(120)
def test_resume_accepts_the_runs_corpus_moved_elsewhere(trained, run_copy, tmp_path):
    shutil.copy(trained / "corpus.txt", tmp_path / "moved.txt")
    result = run_cli("train", "--resume", "--out", run_copy, "--data", tmp_path / "moved.txt", "--steps", 2)
    assert result.exit_code == 0, result.output
    from ringpipe.model.training.run_dir import saved_config

    assert saved_config(str(run_copy)).data == str(tmp_path / "moved.txt")  # the next resume looks there


def test_resume_accepts_the_same_corpus_named_relative_to_another_directory(trained, run_copy, monkeypatch):
    monkeypatch.chdir(trained.parent)
    result = run_cli("train", "--resume", "--out", run_copy, "--data", os.path.join(trained.name, "corpus.txt"),
                     "--steps", 1)  # already complete: nothing trains, the flags are only checked
    assert result.exit_code == 0 and "already complete" in result.output, result.output


def test_resume_with_more_steps_says_the_lr_schedule_is_recomputed(run_copy):
    result = run_cli("train", "--resume", "--out", run_copy, "--steps", 2)
    assert result.exit_code == 0, result.output
    note = next(line for line in result.output.splitlines() if line.startswith("note: --steps 2"))
    assert "the run had 1" in note and "schedule is recomputed for 2 steps" in note and "step 2" in note, note

"""`ringpipe train --max-restarts`: a worker that fails (killed, stopped, killed while saving) makes
the driver stop every worker, start them again and resume from the last committed checkpoint; the
final weights equal an uninterrupted run's to the bit. Faults come from RINGPIPE_FAULT
(runtime/fault_injection.py), so each happens at a known step. Bad input is one line up front."""
import json
import os
import random
import secrets
import shutil
import subprocess
import sys

import click
import pytest

from ringpipe.cluster.restarts import RestartableFailure, restartable, run_with_restarts
from ringpipe.model.training.parallel_trainer import Layout
from ringpipe.runtime.calls import RemoteError
from ringpipe.runtime.fault_injection import Fault, FaultInjector
from tests.conftest import TEXT, one_error_line, processes_tagged, run_cli
from tests.short_heartbeat import use_short_heartbeat

RUN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "8",
       "--microbatches", "2", "--lr", "1e-2", "--warmup", "0", "--eval-iters", "1", "--dtype", "float64",
       "--eval-every", "0", "--steps", "6", "--checkpoint-every", "2", "--dropout", "0.1"]
TWO_WORKERS = ["--nproc", "2", "--dp", "2"]
ONE_WORKER = ["--nproc", "1"]  # with --max-restarts still a worker process (a restart starts it again)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """uninterrupted(workers): the run directory of the same run with no fault (made once)."""
    made = {}

    def run(workers: list) -> str:
        if tuple(workers) not in made:
            out = tmp_path_factory.mktemp("uninterrupted") / "run"
            fault = os.environ.pop("RINGPIPE_FAULT", None)
            try:  # --max-restarts, as the faulty runs: worker processes even for one worker
                result = run_cli("train", "--data", data, *RUN, *workers, "--out", out, "--max-restarts", "1")
            finally:
                if fault is not None:
                    os.environ["RINGPIPE_FAULT"] = fault
            assert result.exit_code == 0, result.output
            made[tuple(workers)] = str(out)
        return made[tuple(workers)]
    return run


def _weights(out) -> bytes:
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        return f.read()


def _metrics(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _faulty_run(data, out, workers, fault, monkeypatch):
    tag = secrets.token_hex(8)  # every worker of either attempt inherits it
    monkeypatch.setenv("RINGPIPE_TEST_TAG", tag)
    monkeypatch.setenv("RINGPIPE_FAULT", fault)
    result = run_cli("train", "--data", data, *RUN, *workers, "--out", out, "--max-restarts", "1")
    assert result.exit_code == 0, result.output
    assert not processes_tagged(tag)  # nothing of either attempt is left running
    return result


@pytest.mark.timeout(120)
def test_a_worker_killed_at_a_random_step_is_restarted_and_the_final_weights_equal_an_uninterrupted_run_to_the_bit(
        data, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    step = random.randint(1, 6)
    resumed = (step - 1) // 2 * 2  # checkpoints every 2 steps
    result = _faulty_run(data, out, TWO_WORKERS, f"rank=1,step={step},kind=kill", monkeypatch)
    restart = next(line for line in result.output.splitlines() if line.startswith("restart 1 of 1"))
    assert "worker rank 1" in restart and "SIGKILL" in restart and f"resuming from step {resumed} " in restart, \
        (step, restart)
    assert _weights(out) == _weights(uninterrupted(TWO_WORKERS)), step
    rows = _metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in rows] == [row["loss"] for row in _metrics(uninterrupted(TWO_WORKERS))]
    first = rows[resumed]  # the first row the restarted run wrote
    assert first["restart"] == 1 and first["resumed_from_step"] == resumed and "SIGKILL" in first["restart_cause"]
    assert all("restart" not in row for row in rows[:resumed])


@pytest.mark.timeout(120)
def test_a_stopped_worker_is_noticed_by_its_silence_and_the_restarted_run_ends_bit_identical(
        data, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    use_short_heartbeat(monkeypatch)  # 3 s of silence, not the default 8 s
    result = _faulty_run(data, out, ONE_WORKER, "rank=0,step=3,kind=stop", monkeypatch)
    restart = next(line for line in result.output.splitlines() if line.startswith("restart 1 of 1"))
    assert "worker rank 0" in restart and "heartbeat" in restart and "resuming from step 2" in restart, restart
    assert _weights(out) == _weights(uninterrupted(ONE_WORKER))


@pytest.mark.timeout(120)
def test_a_rank_killed_during_a_checkpoint_save_restarts_from_the_previous_checkpoint_bit_identical(
        data, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = _faulty_run(data, out, ONE_WORKER, "rank=0,step=4,kind=during-save", monkeypatch)
    restart = next(line for line in result.output.splitlines() if line.startswith("restart 1 of 1"))
    # The save after step 4 was never committed: the run resumed from step 2's, and the unfinished
    # directory was removed before the workers started again.
    assert "resuming from step 2" in restart, restart
    assert _weights(out) == _weights(uninterrupted(ONE_WORKER))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004", "step-00000006"]


@pytest.mark.timeout(120)
def test_a_damaged_latest_checkpoint_is_one_line_naming_the_older_whole_one_and_nothing_restarts(
        uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted(ONE_WORKER), out)
    latest = out / "checkpoints" / "step-00000006"
    with open(latest / "rank-00000.safetensors", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)  # a flipped tail: the piece no longer matches its checksum
    attempts = []

    def attempt(restart):
        attempts.append(restart)
        raise RestartableFailure("worker rank 0 died", RuntimeError("worker rank 0 died"))
    with pytest.raises(click.ClickException) as raised:
        run_with_restarts(attempt, {"max_restarts": 1, "launcher": "local", "resume": True}, Layout(), str(out), {})
    message = raised.value.message
    assert attempts == [0]
    assert message.startswith(f"worker rank 0 died; not restarting: the latest checkpoint {latest} is damaged")
    assert "checksum" in message and \
        f"the newest older checkpoint, {out / 'checkpoints' / 'step-00000004'} (step 4), is intact" in message


def test_after_max_restarts_failed_attempts_the_last_failure_is_the_error(tmp_path):
    attempts = []

    def attempt(restart):
        attempts.append(restart)
        raise RestartableFailure(f"failure {restart}", RuntimeError(f"worker rank 0 failed in attempt {restart}"))
    flags = {"max_restarts": 2, "launcher": "local", "resume": False}
    with pytest.raises(RestartableFailure, match="failure 2"):
        run_with_restarts(attempt, flags, Layout(), str(tmp_path), {})
    assert attempts == [0, 1, 2]


def test_a_rank_that_cannot_write_its_checkpoint_is_not_restarted():
    full = RemoteError(1, "FileWriteError", "cannot write run/checkpoints/step-00000004/rank-00001.safetensors: "
                                            "No space left on device", "", "ParallelTrainer.save_checkpoint_pieces")
    died = RemoteError(1, "InjectedFault", "injected fault", "", "ParallelTrainer.train_step")
    assert not isinstance(restartable(full, click.ClickException("no space")), RestartableFailure)
    assert isinstance(restartable(died, click.ClickException("raised")), RestartableFailure)


def test_max_restarts_without_checkpoints_is_one_line_before_anything_starts(data, tmp_path):
    line = one_error_line(run_cli("train", "--data", data, *RUN, "--checkpoint-every", "0", "--out",
                                  tmp_path / "run", "--max-restarts", "2"))
    assert "--max-restarts" in line and "--checkpoint-every" in line
    assert not os.path.exists(tmp_path / "run" / "tokens.bin")


def test_max_restarts_under_a_launcher_the_driver_cannot_restart_is_one_line(data, tmp_path):
    line = one_error_line(run_cli("train", "--data", data, "--dp", "2", "--launcher", "mpi",
                                  "--out", tmp_path / "run", "--max-restarts", "1"))
    assert "--max-restarts" in line and "--launcher mpi" in line


@pytest.mark.parametrize("value, complaint", [("rank=1,step=0,kind=kill", "step 1 or more"),
                                              ("rank=1,kind=kill", "step missing"),
                                              ("rank=1,step=2,kind=explode", "kind 'explode'"),
                                              ("rank=7,step=2,kind=kill", "rank 7 is not among the run's ranks 0..1"),
                                              ("rank=0,step=7,kind=kill", "step 7 is beyond --steps 6")])
def test_a_malformed_or_never_firing_fault_is_one_line_naming_the_variable(data, tmp_path, monkeypatch, value,
                                                                           complaint):
    monkeypatch.setenv("RINGPIPE_FAULT", value)
    line = one_error_line(run_cli("train", "--data", data, *RUN, *TWO_WORKERS, "--out", tmp_path / "run"))
    assert "RINGPIPE_FAULT" in line and complaint in line


def test_a_fault_in_a_run_without_worker_processes_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setenv("RINGPIPE_FAULT", "rank=0,step=2,kind=kill")
    line = one_error_line(run_cli("train", "--data", data, *RUN, "--out", tmp_path / "run"))
    assert "RINGPIPE_FAULT" in line and "no worker processes" in line


def test_the_injector_fires_on_its_rank_at_its_step_and_only_in_the_first_run():
    environment = {"RINGPIPE_FAULT": "rank=1,step=3,kind=raise"}
    assert FaultInjector(0, environment).fault is None
    assert FaultInjector(1, {**environment, "TORCHELASTIC_RESTART_COUNT": "1"}).fault is None
    injector = FaultInjector(1, environment)
    injector.before_step(0)
    injector.before_step(1)
    with pytest.raises(RuntimeError, match="injected fault"):
        injector.before_step(2)
    injector.before_step(2)  # once only
    assert Fault.parse(" rank=0 , step=7 , kind=during-save ") == Fault(0, 7, "during-save")


@pytest.mark.parametrize("kind, code", [("exit", 3), ("kill", -9)])
def test_the_injected_exit_and_kill_end_the_process_as_named(kind, code):
    script = ("from ringpipe.runtime.fault_injection import FaultInjector\n"
              "FaultInjector(0).before_step(1)\nprint('survived')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, RINGPIPE_FAULT=f"rank=0,step=2,kind={kind}"))
    assert done.returncode == code and "survived" not in done.stdout, (done.returncode, done.stderr)

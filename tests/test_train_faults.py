"""`ringpipe train` when a worker dies, stops or hangs: one line naming it, the resume hint, a
non-zero exit and no process left, wherever the driver is at that moment."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import ringpipe.cluster.distributed_train as distributed_train
from ringpipe.model.training import sharded_checkpoint
from ringpipe.cluster.cli import main
from ringpipe.runtime import Cluster
from tests.conftest import process_alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "8",
         "--microbatches", "2", "--lr", "1e-2", "--warmup", "0", "--eval-iters", "1"]


def _children(pid):
    """Pids of the processes whose parent is `pid` (the workers of a driver)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(out)


def _metric_lines(out):
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


@pytest.mark.timeout(120)
def test_a_stopped_worker_ends_ringpipe_train_within_seconds_with_one_line(corpus, tmp_path):
    out = str(tmp_path / "run")
    # tests.short_heartbeat: the ringpipe command with a 3 s heartbeat bound, which this test waits out.
    cmd = [sys.executable, "-m", "tests.short_heartbeat", "train", "--data", corpus, *SMALL, "--steps", "100000",
           "--checkpoint-every", "3", "--eval-every", "0", "--nproc", "4", "--tp", "2", "--pp", "2", "--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while _metric_lines(out) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 4 and _metric_lines(out) >= 4, proc.poll()
        os.kill(workers[2], signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        leftovers = [pid for pid in workers if process_alive(pid)]
        for pid in leftovers:  # a stopped worker cannot even notice that its driver is gone
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"workers {leftovers} were still running"
    assert proc.returncode != 0
    assert elapsed < 10.0, elapsed  # noticed within 3 s; the rest is stopping everything
    assert "Traceback" not in stderr, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("Error: worker rank ") and f"(pid {workers[2]})" in error, stderr
    assert "heartbeat" in error and f"--resume --out {out}" in error
    # Before the error line, the report: that rank first, then what the driver did to the others.
    report = stderr[stderr.index("Root cause (first failure)"):]
    root, consequences = report.split("Consequences on the other ranks:")
    assert f"host {socket.gethostname()}, pid {workers[2]}): sent no heartbeat for" in root
    assert "its process is stopped" in root and os.path.join(out, "logs", "rank-") in root
    assert consequences.count("stopped by the driver") == 3, report
    assert sorted(os.listdir(os.path.join(out, "logs"))) == [f"rank-{rank}.log" for rank in range(4)]


# ---- a worker killed while the driver does its own part of the work --------------------------------
class _RecordingCluster(Cluster):
    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _RecordingCluster.last = self


def _kill_a_worker_and_wait_until_noticed():
    cluster = _RecordingCluster.last
    os.kill(cluster.pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cluster.failure is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cluster.failure is not None


def _killing_first(function, on_call=1):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            _kill_a_worker_and_wait_until_noticed()
        return function(*args, **kwargs)
    return wrapper


def _killing_after(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        _kill_a_worker_and_wait_until_noticed()
        return result
    return wrapper


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["setup", "evaluation", "committing a checkpoint",
                                   "writing a checkpoint", "writing traces"])
def test_a_worker_killed_during_driver_side_work_ends_train_with_one_line_and_the_resume_hint(
        corpus, tmp_path, monkeypatch, where):
    monkeypatch.setattr(distributed_train, "Cluster", _RecordingCluster)
    extra = []
    if where == "setup":
        monkeypatch.setattr(_RecordingCluster, "spawn", _killing_first(Cluster.spawn))
    elif where == "evaluation":
        monkeypatch.setattr(distributed_train, "mean_validation_loss",
                            _killing_first(distributed_train.mean_validation_loss))
    elif where == "committing a checkpoint":
        # The second checkpoint: every rank has written its pieces, the driver commits them.
        monkeypatch.setattr(sharded_checkpoint, "commit", _killing_first(sharded_checkpoint.commit, on_call=2))
    elif where == "writing a checkpoint":
        monkeypatch.setattr(distributed_train, "save_sharded_checkpoint",
                            _killing_after(distributed_train.save_sharded_checkpoint))
    else:
        monkeypatch.setattr(_RecordingCluster, "stop_trace", _killing_first(Cluster.stop_trace))
        extra = ["--trace"]
    out = str(tmp_path / "run")
    # Checkpoints after steps 2 and 4, one evaluation after the last step (6).
    flags = ["train", "--data", corpus, *SMALL, "--steps", "6", "--eval-every", "0", "--checkpoint-every", "2",
             "--nproc", "2", "--pp", "2", "--out", out, *extra]
    result = CliRunner().invoke(main, flags, catch_exceptions=False)  # a traceback fails the test
    assert result.exit_code != 0
    error = result.output.strip().splitlines()[-1]
    pid = _RecordingCluster.last.pids[1]
    assert error.startswith(f"Error: worker rank 1 (pid {pid}) on host {socket.gethostname()} was killed by signal "
                            "SIGKILL"), result.output
    assert "cluster is stopped" not in error and "Traceback" not in result.output
    root = result.output[result.output.index("Root cause (first failure)"):result.output.index("Consequences")]
    assert f"rank 1 (host {socket.gethostname()}, pid {pid}): was killed by signal SIGKILL" in root, result.output
    if where == "setup":
        assert error.endswith("no checkpoint was saved yet, so start the run again"), error
    else:
        assert error.endswith(f"continue from the last checkpoint with --resume --out {out}"), error
    left = [pid for pid in _RecordingCluster.last.pids if process_alive(pid)]
    assert not left, f"workers {left} still running"


def raise_on_rank_1(comm):
    if comm.rank == 1:
        raise ValueError("a value no step can take, on rank 1")
    comm.barrier()


@pytest.mark.timeout(120)
def test_a_worker_that_raises_mid_training_ends_train_with_the_report_then_one_line(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed_train, "Cluster", _RecordingCluster)
    train_step = distributed_train.DistributedRun.train_step

    def raising_at_step_2(run, step):
        if step == 2:  # a real worker raises, inside the real run
            run.cluster.run(raise_on_rank_1)
        return train_step(run, step)

    monkeypatch.setattr(distributed_train.DistributedRun, "train_step", raising_at_step_2)
    out = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["train", "--data", corpus, *SMALL, "--steps", "4", "--eval-every", "0",
                                       "--nproc", "2", "--dp", "2", "--out", out], catch_exceptions=False)
    assert result.exit_code != 0
    pids = _RecordingCluster.last.pids
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: rank 1 raised ValueError: a value no step can take, on rank 1 in raise_on_rank_1")
    root = result.output[result.output.index("Root cause (first failure)"):result.output.index("Consequences")]
    assert f"rank 1 (host {socket.gethostname()}, pid {pids[1]}): raised ValueError: a value no step" in root
    assert "| ValueError: a value no step can take, on rank 1" in root and "Traceback" not in result.output
    with open(os.path.join(out, "logs", "rank-1.log")) as f:
        assert "raise ValueError(\"a value no step can take, on rank 1\")" in f.read()
    assert not [pid for pid in pids if process_alive(pid)]

"""Under a real single-machine Slurm (marker multihost; about 40 s): `ringpipe train --launcher slurm`
inside salloc or an sbatch script starts its workers with srun; under `srun ringpipe train --launcher slurm` rank 0
drives. Ranks come from SLURM_PROCID, hosts from SLURMD_NODENAME; the runs equal one process."""
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from ringpipe.runtime.auth import create_key_file
from tests.conftest import one_error_line, processes_tagged, run_cli, tagged_processes_left
from tests.local_slurm import LocalSlurm, SlurmUnavailable
from tests.multihost_fixtures import TRAIN, losses

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(180)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def slurm():
    try:
        with LocalSlurm() as running:
            yield running
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm here: {exc}")


def test_inside_an_allocation_train_starts_its_workers_with_srun(slurm, corpus, tmp_path, one_process_losses):
    done = subprocess.run(["salloc", "--ntasks=2", sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus,
                           *TRAIN, "--out", str(tmp_path / "allocated"), "--dp", "2", "--launcher", "slurm"],
                          env=slurm.environment, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert f"{socket.gethostname()}: ranks 0-1" in done.stderr  # the placement names Slurm's node
    assert losses(tmp_path / "allocated") == pytest.approx(one_process_losses, rel=1e-12)


def test_a_batch_script_trains_with_its_workers_started_by_srun(slurm, corpus, tmp_path, one_process_losses):
    command = [sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus, *TRAIN, "--out",
               str(tmp_path / "batch"), "--dp", "2", "--launcher", "slurm"]
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexec " + " ".join(shlex.quote(str(part)) for part in command) + "\n")
    log = tmp_path / "job.log"
    submitted = subprocess.run(["sbatch", "--parsable", "--ntasks=2", f"--output={log}", str(script)],
                               env=slurm.environment, capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    state = slurm.wait_for_job(submitted.stdout.strip().split(";")[0], timeout=150)
    assert state == "JobState=COMPLETED ExitCode=0:0", (state, log.read_text() if log.exists() else "no log")
    assert f"{socket.gethostname()}: ranks 0-1" in log.read_text()
    assert losses(tmp_path / "batch") == pytest.approx(one_process_losses, rel=1e-12)


def test_under_srun_rank_0_drives_and_the_others_run_their_worker(slurm, corpus, tmp_path, one_process_losses):
    key_file = str(tmp_path / "keys" / "rendezvous.key")
    create_key_file(key_file)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    done = subprocess.run(["srun", "--ntasks=2", sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus,
                           *TRAIN, "--out", str(tmp_path / "stepped"), "--dp", "2", "--launcher", "slurm",
                           "--rdzv-endpoint", endpoint, "--key-file", key_file],
                          env=slurm.environment, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "stepped") == pytest.approx(one_process_losses, rel=1e-12)


def test_launcher_slurm_outside_an_allocation_is_one_line(corpus, tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                  "--launcher", "slurm"))
    assert "not inside a Slurm allocation" in line


@pytest.mark.parametrize("how", ["scancel", "driver killed"])
def test_a_cancelled_job_or_a_killed_driver_leaves_no_ringpipe_process(slurm, corpus, tmp_path, how):
    """scancel of a running `ringpipe train --launcher slurm` inside salloc, or SIGKILL of that
    driver: the driver, the agents srun started and their workers all end (the agents see srun's
    input, which the driver held open, end; after scancel the driver hears its workers go silent:
    tests.short_heartbeat is the ringpipe command with a 3 s heartbeat bound, not the default 8 s)."""
    tag = f"slurm-{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "run"
    salloc = subprocess.Popen(["salloc", "--ntasks=2", sys.executable, "-m", "tests.short_heartbeat", "train", "--data",
                               corpus, *TRAIN, "--steps", "100000", "--out", str(out), "--dp", "2", "--launcher",
                               "slurm"], env=dict(slurm.environment, RINGPIPE_TEST_TAG=tag), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert salloc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        assert len(processes_tagged(tag)) >= 5  # salloc, the driver, srun, two agents and their workers
        if how == "scancel":
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm.environment, capture_output=True, text=True)
            assert len(jobs.stdout.split()) == 1, jobs.stdout
            subprocess.run(["scancel", jobs.stdout.split()[0]], env=slurm.environment, check=True)
        else:
            driver = [pid for pid in processes_tagged(tag) if _parent(pid) == salloc.pid]
            assert len(driver) == 1, driver
            os.kill(driver[0], signal.SIGKILL)
        assert tagged_processes_left(tag, 20 if how == "scancel" else 10) == []
    finally:
        if salloc.poll() is None:
            salloc.kill()
        salloc.wait()
        for pid in processes_tagged(tag):
            os.kill(pid, signal.SIGKILL)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

"""Under a real OpenMPI `mpirun` (marker multihost; about 30 s): ranks come from OMPI_COMM_WORLD_*,
rank 0 drives (`ringpipe train --launcher mpi`), or every rank joins a driver (`ringpipe worker`).
Under MPICH's `mpiexec` (Hydra; PyPI's mpich in /opt/mpich, .ci/install_mpi.sh) from PMI_RANK/PMI_SIZE."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from ringpipe.runtime.auth import create_key_file
from tests.multihost_fixtures import TRAIN, losses

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(180)]
needs_openmpi = pytest.mark.skipif(shutil.which("mpirun") is None,
                                   reason="no mpirun (Debian's openmpi-bin; .ci/install_mpi.sh)")
# MPICH's launcher beside OpenMPI's: not on PATH, where it would take the name mpirun.
HYDRA = next((path for path in (shutil.which("mpiexec.hydra"), "/opt/mpich/bin/mpiexec.hydra")
              if path and os.access(path, os.X_OK)), None)

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-x", "PYTHONPATH"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key_file(tmp_path) -> str:
    path = str(tmp_path / "keys" / "rendezvous.key")
    create_key_file(path)
    return path


@needs_openmpi
def test_under_mpirun_rank_0_drives_and_the_run_equals_one_process(corpus, tmp_path, key_file, one_process_losses):
    done = subprocess.run([*MPIRUN, "-np", "2", sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus,
                           *TRAIN, "--out", str(tmp_path / "mpi"), "--dp", "2", "--launcher", "mpi",
                           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--key-file", key_file],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "mpi") == pytest.approx(one_process_losses, rel=1e-12)


def _place(comm):
    return {name: os.environ[name] for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}


def _cores(comm):
    from ringpipe.runtime import cgroups, cpu_binding, shm_wait

    return sorted(os.sched_getaffinity(0)), len(cgroups.cpuset_cpus()), cpu_binding.host_cores(), shm_wait.cores()


@needs_openmpi
def test_mpirun_workers_join_a_driver_with_their_mpi_ranks_and_torchruns_local_view(tmp_path, key_file):
    from ringpipe.cluster.launchers import join_launcher
    from ringpipe.runtime import Cluster

    endpoint = f"127.0.0.1:{free_port()}"
    workers = subprocess.Popen([*MPIRUN, "-np", "2", sys.executable, "-m", "ringpipe.cluster", "worker",
                                "--rdzv-endpoint", endpoint, "--key-file", key_file], stderr=subprocess.PIPE)
    try:
        options = join_launcher(endpoint, 2, 1, 0, key_file, 60.0, lambda message: None)
        with Cluster(2, **options) as cluster:
            # One agent per MPI rank, yet each worker sees its host's two ranks, as torchrun's would.
            assert cluster.run(_place) == [{"RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                                            "GROUP_RANK": "0"} for r in range(2)]
            # mpirun binds each of two ranks to a core of its own (where the machine has two): each
            # counts the job's cores, not its one, so its waits and copies act as on a free host.
            for own, whole, host, waits in cluster.run(_cores):
                if len(own) < whole:
                    assert host == waits == min(whole, 2 * len(own)), (own, whole, host)
                else:
                    assert host == waits == len(own)
        assert workers.wait(timeout=30) == 0
    finally:
        if workers.poll() is None:
            workers.kill()
        workers.wait()


@pytest.mark.skipif(HYDRA is None, reason="no MPICH mpiexec.hydra (PyPI's mpich into /opt/mpich; .ci/install_mpi.sh)")
def test_under_mpichs_mpiexec_ranks_come_from_pmi_and_the_run_equals_one_process(corpus, tmp_path, key_file, one_process_losses):
    done = subprocess.run([HYDRA, "-n", "2", sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus,
                           *TRAIN, "--out", str(tmp_path / "mpich"), "--dp", "2", "--launcher", "mpi",
                           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--key-file", key_file],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "mpich") == pytest.approx(one_process_losses, rel=1e-12)


def test_a_killed_mpirun_leaves_no_ringpipe_process(corpus, tmp_path, key_file):
    """mpirun SIGKILLed mid-run cannot stop its ranks: they end with it (parent-death signal), and
    their workers with them."""
    from tests.conftest import processes_tagged, tagged_processes_left

    tag = f"mpirun-{os.getpid()}-{time.monotonic_ns()}"
    out = tmp_path / "run"
    train = [sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus, *TRAIN, "--steps", "100000",
             "--out", str(out), "--dp", "2", "--launcher", "mpi", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
             "--key-file", key_file]
    # The ranks write nowhere near mpirun: no broken pipe tells them it is gone, only its death.
    mpirun = subprocess.Popen([*MPIRUN, "-x", "RINGPIPE_TEST_TAG", "-np", "2", "sh", "-c",
                               'exec "$@" >/dev/null 2>&1', "rank", *train], env=dict(os.environ, RINGPIPE_TEST_TAG=tag),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert mpirun.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        ours = [pid for pid in processes_tagged(tag) if pid != mpirun.pid]
        assert len(ours) >= 4, ours  # two ranks (the driver and an agent), a worker each
        mpirun.kill()
        mpirun.wait()
        assert tagged_processes_left(tag, 10) == []
    finally:
        if mpirun.poll() is None:
            mpirun.kill()
            mpirun.wait()
        for pid in processes_tagged(tag):
            os.kill(pid, signal.SIGKILL)

"""When a worker fails, the driver's report names the first failure (rank, host, pid, how it ended,
when, the last lines of its traceback and of its log), then what became of the other ranks; each
rank's output is in RUN/logs/rank-R.log, its stderr also on the console marked with rank and host.
Workers leave nothing running: they die with their launcher, and so does what they started."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ringpipe.runtime import Cluster, RemoteError, WorkerDied
from tests.conftest import process_alive, processes_left

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


def say_then_fail(comm, how):
    print(f"rank {comm.rank} says hello on stdout", flush=True)
    if comm.rank == 1:
        sys.stderr.write("rank 1 is about to fail\n")
        sys.stderr.flush()
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("a bad value on rank 1")
    comm.all_reduce(np.ones(4))
    return comm.rank


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A cluster of 3 whose ranks log into a folder; it survives a raising worker."""
    logs = str(tmp_path_factory.mktemp("run") / "logs")
    with Cluster(3, log_dir=logs, timeout=20) as cluster:
        yield cluster, logs


@pytest.mark.timeout(60)
def test_a_raising_worker_is_reported_first_with_its_traceback_then_the_aborted_ranks(logged):
    cluster, logs = logged
    with pytest.raises(RemoteError) as info:
        cluster.run(say_then_fail, "raise")
    report = info.value.report
    root = report.root
    assert (root.rank, root.host, root.pid) == (1, HOST, cluster.pids[1])
    assert root.what == "raised ValueError: a bad value on rank 1" and root.call == "say_then_fail"
    assert root.traceback.rstrip().endswith("ValueError: a bad value on rank 1")
    assert root.log_path == os.path.join(logs, "rank-1.log") and "ValueError: a bad value on rank 1" in root.log
    assert [(c.rank, c.what.split(":")[0]) for c in report.consequences] == [(0, "aborted"), (2, "aborted")]
    text = report.text()
    assert text.index("Root cause") < text.index("rank 1 (host") < text.index("Consequences") < text.index("rank 0 (")
    assert '| ValueError: a bad value on rank 1' in text and "Traceback" not in text
    assert "the other ranks' part of it was aborted" in text and not report.stopped  # the cluster goes on


@pytest.mark.timeout(60)
def test_each_rank_logs_its_output_to_its_own_file_and_its_stderr_to_the_console_marked(logged, capsys):
    cluster, logs = logged
    with pytest.raises(RemoteError):
        cluster.run(say_then_fail, "raise")
    deadline = time.monotonic() + 10  # the copying thread writes the console lines
    while "rank 1 is about to fail" not in capsys.readouterr().err and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() < deadline, "the stderr line never reached the console"
    for rank in range(3):
        with open(os.path.join(logs, f"rank-{rank}.log")) as f:
            log = f.read()
        assert log.startswith(f"--- ringpipe worker rank {rank} on host {HOST}, started ")
        assert f"rank {rank} says hello on stdout" in log
        assert ("rank 1 is about to fail" in log) == (rank == 1)
    with open(os.path.join(logs, "rank-1.log")) as f:
        assert "ValueError: a bad value on rank 1" in f.read()  # the full traceback too


@pytest.mark.timeout(60)
def test_a_killed_worker_is_reported_first_then_the_ranks_the_driver_stopped(tmp_path, capfd):
    logs = str(tmp_path / "logs")
    cluster = Cluster(3, log_dir=logs)
    pids = cluster.pids
    try:
        with pytest.raises(WorkerDied) as info:
            cluster.run(say_then_fail, "kill")
        assert f"worker rank 1 (pid {pids[1]}) on host {HOST} was killed by signal SIGKILL" in str(info.value)
        report = info.value.report
        assert (report.root.rank, report.root.pid, report.root.exit_code) == (1, pids[1], -signal.SIGKILL)
        assert report.root.what == "was killed by signal SIGKILL" and report.root.traceback == ""
        assert "rank 1 says hello on stdout" in report.root.log and abs(report.root.time - time.time()) < 60
        assert [(c.rank, c.pid) for c in report.consequences] == [(0, pids[0]), (2, pids[2])]
        assert all(c.what.startswith("stopped by the driver") for c in report.consequences), report.text()
        assert "exit code: -9 (SIGKILL)" in report.text() and "every worker is stopped" in report.text()
        with pytest.raises(RuntimeError) as again:  # a later call carries the same report
            cluster.run(say_then_fail, "kill")
        assert again.value.report is report
    finally:
        cluster.close()
    assert not any(process_alive(pid) for pid in pids)
    # What it wrote to stderr before it died reached the console, marked with its rank and host.
    console, deadline = "", time.monotonic() + 10  # a thread copies it
    while "about to fail" not in console and time.monotonic() < deadline:
        console += capfd.readouterr().err
        time.sleep(0.05)
    assert f"[rank 1 host {HOST}] rank 1 is about to fail" in console


def start_a_grandchild(comm):
    """A worker that starts a process of its own (as user code may) and returns its pid."""
    return subprocess.Popen(["sleep", "120"]).pid


@pytest.mark.timeout(60)
def test_what_a_worker_started_ends_with_the_cluster():
    with Cluster(1) as cluster:
        grandchildren = cluster.run(start_a_grandchild)
        assert all(process_alive(pid) for pid in grandchildren)
    assert processes_left(grandchildren, 5) == []


@pytest.mark.timeout(60)
def test_a_stopped_worker_dies_with_its_killed_driver(tmp_path):
    """A stopped (SIGSTOP) worker cannot notice anything itself: the kernel ends it (parent-death signal)."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {ROOT!r})
        from ringpipe.runtime import Cluster
        cluster = Cluster(1)
        os.kill(cluster.pids[0], signal.SIGSTOP)
        print(" ".join(str(pid) for pid in cluster.pids), flush=True)
        time.sleep(60)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in driver.stdout.readline().split()]
    driver.kill()
    driver.wait()
    left = processes_left(pids, 5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert pids and not left, f"workers {left} outlived their driver"


def reduce_for_a_while(comm, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        comm.all_reduce(np.ones(8))


@pytest.mark.timeout(90)
def test_a_stopped_worker_on_a_joined_host_is_reported_as_stopped_by_its_agent(tmp_path):
    from ringpipe.cluster.launchers import join_launcher
    from ringpipe.runtime import WorkerUnresponsive
    from ringpipe.runtime.auth import create_key_file

    key_file = str(tmp_path / "rendezvous.key")
    create_key_file(key_file)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    agent = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "worker", "--rdzv-endpoint", endpoint,
                              "--nproc-per-node", "1", "--key-file", key_file, "--host-id", "joined"])
    try:
        options = join_launcher(endpoint, 1, 1, 0, key_file, 60.0, lambda message: None)
        with Cluster(1, heartbeat_timeout=4.0, **options) as cluster:
            future = cluster.submit(reduce_for_a_while, 60)
            time.sleep(0.5)
            os.kill(cluster.pids[0], signal.SIGSTOP)
            with pytest.raises(WorkerUnresponsive) as info:
                future.result(timeout=60)
        assert info.value.report.root.host == "joined"
        assert info.value.report.root.what.endswith("(its process is stopped, e.g. by SIGSTOP)")
        assert agent.wait(timeout=30) != 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()

"""A stopped, stuck or busy rank: heartbeats tell them apart, and no fault leaves the job hanging."""
import glob
import os
import signal
import socket
import time

import numpy as np
import pytest

from ringpipe.runtime import Cluster, ClusterStopped, WorkerStuck, WorkerUnresponsive
from tests.conftest import process_alive


def _assert_nothing_left(cluster, pids):
    deadline = time.monotonic() + 5
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(process_alive(pid) for pid in pids), "a worker is still running"
    assert glob.glob(f"/dev/shm/ringpipe-{cluster.job_id}-*") == []


def all_reduce_forever(comm):
    while True:
        comm.all_reduce(np.ones(16))
        time.sleep(0.01)


@pytest.mark.timeout(60)
def test_a_stopped_worker_is_reported_within_ten_seconds_naming_rank_pid_and_call():
    cluster = Cluster(3, timeout=120)  # the communication timeout alone would take two minutes
    pids = cluster.pids
    try:
        future = cluster.submit(all_reduce_forever)
        time.sleep(0.5)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(WorkerUnresponsive) as info:
            future.result()
        assert time.monotonic() - stopped < 10.0
        message = str(info.value)
        assert f"worker rank 1 (pid {pids[1]})" in message and "all_reduce_forever" in message
        assert "stopped" in message and info.value.rank == 1 and info.value.pid == pids[1]
        _assert_nothing_left(cluster, pids)
        with pytest.raises(ClusterStopped, match="rank 1"):
            cluster.run(all_reduce_forever)
    finally:
        cluster.close()


@pytest.mark.timeout(60)
def test_a_worker_stopped_between_calls_stops_the_cluster_and_the_next_call_says_why():
    cluster = Cluster(1, heartbeat_interval=0.5, heartbeat_timeout=3.0)
    pids = cluster.pids
    try:
        os.kill(pids[0], signal.SIGSTOP)
        deadline = time.monotonic() + 10.0
        while cluster.failure is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert isinstance(cluster.failure, WorkerUnresponsive)
        assert "idle" in str(cluster.failure)
        with pytest.raises(ClusterStopped, match=f"rank 0 \\(pid {pids[0]}\\)"):
            cluster.run(all_reduce_forever)
        _assert_nothing_left(cluster, pids)
    finally:
        cluster.close()


def sleep_in_user_code(comm):
    if comm.rank == 1:
        time.sleep(120)
    comm.all_reduce(np.ones(16))
    return comm.rank


class Sleeper:
    def __init__(self, comm):
        self.comm = comm

    def step(self):
        return sleep_in_user_code(self.comm)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["run", "actor method"])
def test_a_rank_sleeping_while_the_others_all_reduce_is_reported_with_its_stack(kind):
    timeout = 1.0
    cluster = Cluster(2, timeout=timeout, stuck_grace=1.0)  # reported stuck 1 s after rank 0 timed out
    pids = cluster.pids
    try:
        if kind == "run":
            future = cluster.submit(sleep_in_user_code)
        else:
            future = cluster.spawn(Sleeper).step()
        start = time.monotonic()
        with pytest.raises(WorkerStuck) as info:
            future.result()
        assert time.monotonic() - start < timeout + 5.0
        error = info.value
        assert error.rank == 1 and error.pid == pids[1]
        first_line = str(error).splitlines()[0]
        assert f"worker rank 1 (pid {pids[1]}) on host {socket.gethostname()} made no progress in" in first_line
        assert ("sleep_in_user_code" if kind == "run" else "Sleeper.step") in first_line
        assert "timed out waiting for it" in first_line
        # The stack of rank 1's compute thread, from the user's function down to the sleep.
        assert "in sleep_in_user_code" in error.stack and "time.sleep(120)" in error.stack
        assert "time.sleep(120)" in str(error)
        _assert_nothing_left(cluster, pids)
    finally:
        cluster.close()


def compute_then_all_reduce(comm, seconds):
    end = time.monotonic() + seconds
    if comm.rank == 0:
        a = np.random.default_rng(0).standard_normal((300, 300))
        while time.monotonic() < end:  # pure Python and NumPy, never touching the communicator
            total = 0
            for i in range(20_000):
                total += i * i
            a = np.tanh(a @ a.T / 300.0)
    x = np.full(4, comm.rank + 1.0)
    comm.all_reduce(x)
    return float(x[0])


@pytest.mark.timeout(60)
def test_a_busy_rank_keeps_sending_heartbeats_and_is_not_reported():
    # Heartbeats come from the engine thread, which gets the interpreter while the compute thread
    # runs Python loops and NumPy kernels; a silence limit well under the compute time proves it.
    with Cluster(2, heartbeat_interval=0.2, heartbeat_timeout=1.5, timeout=30) as cluster:
        assert cluster.run(compute_then_all_reduce, 2.5) == [3.0, 3.0]
        assert cluster.failure is None


def fail_on_rank_0_then_finish_slowly(comm, seconds):
    if comm.rank == 0:
        raise ValueError("bad input on purpose")
    time.sleep(seconds)
    return comm.rank


@pytest.mark.timeout(60)
def test_a_rank_that_computes_on_after_another_failed_is_given_the_communication_timeout():
    # Rank 1 is not waited for by anyone: it may compute on (up to the communication timeout).
    with Cluster(2, timeout=10, stuck_grace=0.5) as cluster:
        with pytest.raises(Exception) as info:
            cluster.run(fail_on_rank_0_then_finish_slowly, 1.5)
        assert "bad input on purpose" in str(info.value) and not isinstance(info.value, WorkerStuck)
        assert cluster.run(compute_then_all_reduce, 0.0) == [3.0, 3.0]


def test_heartbeat_settings_are_checked():
    with pytest.raises(ValueError, match="heartbeat_interval"):
        Cluster(2, heartbeat_interval=5.0, heartbeat_timeout=2.0)


def test_what_a_rank_was_doing_is_the_call_sent_to_it_when_its_last_heartbeat_is_from_an_earlier_call():
    """A rank that dies within a second of starting a call never beat in it: its last heartbeat
    names the call before (a reviewer saw 'running ParallelTrainer() for 0.0s' for a rank training)."""
    from ringpipe.runtime.liveness import LivenessMonitor

    monitor = LivenessMonitor(2, launcher=None, heartbeat_timeout=8.0, stuck_grace=3.0, comm_timeout=60.0,
                              ask_stack=lambda rank: None)
    monitor.heard(1, {"t": "beat", "call": 3, "name": "ParallelTrainer()", "seconds": 0.0, "waiting": []})
    doing = monitor.doing(1, {1: "ParallelTrainer.train_step"})
    assert doing.startswith("running ParallelTrainer.train_step") and "ParallelTrainer() for" not in doing
    monitor.heard(1, {"t": "beat", "call": 4, "name": "ParallelTrainer.train_step", "seconds": 2.5, "waiting": []})
    assert monitor.doing(1, {1: "ParallelTrainer.train_step"}).startswith("running ParallelTrainer.train_step for 2.5s")
    assert monitor.doing(1, {}).startswith("running ParallelTrainer.train_step for 2.5s")

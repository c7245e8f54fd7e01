"""The group channel's thread runs its asynchronous collectives above the compute threads
(runtime/thread_priority.py): RINGPIPE_COMM_THREAD_NICE, its default, "off", and a bad value named."""
import os

import numpy as np
import pytest

from ringpipe.runtime import Cluster, thread_priority
from tests.test_runtime_env_setting import check_setting

DEFAULT_NICE = thread_priority.process_nice() - thread_priority.DEFAULT_RAISE  # (the tests run at nice 0..9)


def test_the_nice_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    check_setting(monkeypatch, "RINGPIPE_COMM_THREAD_NICE", thread_priority.comm_thread_nice,
                  thread_priority.comm_thread_nice.cache_clear,
                  [(None, DEFAULT_NICE), ("off", None), ("5", 5), ("-20", -20), ("19", 19)],
                  ["high", "-21", "20", "1.5"])


def priorities(comm):
    """(nice of the channel's thread, whether it was raised, nice of this main thread) after an
    asynchronous all_reduce ran there."""
    group = comm.new_group([0, 1])
    out = group.all_reduce(np.ones(1000), async_op=True).wait(timeout=20)  # (a dead channel thread: no hang)
    assert out[0] == 2.0
    channel = comm.engine.channels[group.group.gid]
    thread = channel._thread
    return (os.getpriority(os.PRIO_PROCESS, thread.native_id), channel.priority_raised,
            os.getpriority(os.PRIO_PROCESS, 0))


@pytest.mark.timeout(60)
def test_the_channel_thread_runs_at_the_nice_asked_for_and_the_compute_thread_keeps_its_own(local_cluster):
    for nice, raised, main in local_cluster(2).run(priorities):
        assert main == 0
        if raised:
            assert nice == DEFAULT_NICE
        else:  # not permitted here (no CAP_SYS_NICE: a container's root often lacks it too): the
            assert not _can_raise_priority() and nice == 0  # thread keeps the process's priority


def priorities_not_permitted(comm, error="permission"):
    """priorities(comm) where raising a thread's priority fails with `error` (EACCES, as without
    CAP_SYS_NICE; an OverflowError: a thread id beyond a C int, as macOS's may be)."""
    real = os.setpriority

    def refuse(which, who, nice):
        raise PermissionError(13, "Permission denied") if error == "permission" else OverflowError("too large")

    os.setpriority = refuse
    try:
        return priorities(comm)
    finally:
        os.setpriority = real


@pytest.mark.timeout(60)
def test_a_thread_refused_the_priority_keeps_the_process_s_and_runs_the_collectives(local_cluster):
    for nice, raised, main in local_cluster(2).run(priorities_not_permitted):
        assert (nice, raised, main) == (0, False, 0)


@pytest.mark.timeout(60)
def test_any_failure_to_raise_the_priority_leaves_the_channel_thread_running_its_collectives(local_cluster):
    for nice, raised, main in local_cluster(2).run(priorities_not_permitted, "overflow"):
        assert (nice, raised, main) == (0, False, 0)


def test_apply_calls_setpriority_on_a_thread_id_only_on_linux(monkeypatch):
    """Elsewhere PRIO_PROCESS takes a process id, and a thread id there may name another process."""
    import sys

    calls = []
    monkeypatch.setattr(os, "setpriority", lambda *args: calls.append(args), raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert thread_priority.apply(-10) is False and calls == []
    monkeypatch.setattr(sys, "platform", "linux")
    assert thread_priority.apply(-10) is True and len(calls) == 1


@pytest.mark.timeout(60)
def test_off_leaves_the_thread_as_it_started_and_a_bad_value_stops_the_cluster_before_a_worker_starts():
    with Cluster(2, env={"RINGPIPE_COMM_THREAD_NICE": "off"}) as cluster:
        for nice, raised, main in cluster.run(priorities):
            assert (nice, raised, main) == (0, True, 0)
    with pytest.raises(ValueError, match="RINGPIPE_COMM_THREAD_NICE='urgent': expected an integer from -20 to 19"):
        Cluster(2, env={"RINGPIPE_COMM_THREAD_NICE": "urgent"})


def everyones_priorities(comm):
    """The nice of the channel threads of a group of every rank and of a group of ranks 0 and 1 (None
    on the ranks outside it), after an asynchronous all_reduce on each."""
    nices = []
    for ranks in (list(range(comm.size)), [0, 1]):
        group = comm.new_group(ranks)
        if group is None:
            nices.append(None)
            continue
        group.all_reduce(np.ones(1000), async_op=True).wait(timeout=20)
        nices.append(os.getpriority(os.PRIO_PROCESS, comm.engine.channels[group.group.gid]._thread.native_id))
    return nices


@pytest.mark.timeout(60)
def test_with_more_ranks_than_cores_the_thread_keeps_the_process_s_priority(local_cluster):
    ranks = len(os.sched_getaffinity(0)) + 1  # (a peer may need this core more than this thread does)
    if ranks > 8:
        pytest.skip(f"{ranks} ranks: too many processes for a test")
    # (a group of two fits the cores, but the host's other ranks share them: its thread stays too)
    assert local_cluster(ranks).run(everyones_priorities) == [[0, 0], [0, 0]] + [[0, None]] * (ranks - 2)


def refused_explicit_nice(comm):
    """The warnings a rank logs when RINGPIPE_COMM_THREAD_NICE=-5 may not be set (setpriority refused)."""
    import logging

    os.environ["RINGPIPE_COMM_THREAD_NICE"] = "-5"
    thread_priority.comm_thread_nice.cache_clear()
    thread_priority._said.clear()
    seen, real = [], os.setpriority
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("ringpipe").addHandler(handler)

    def refuse(which, who, nice):
        raise PermissionError(13, "Permission denied")

    os.setpriority = refuse
    try:
        for _ in range(2):  # (said once per process)
            priorities(comm)
    finally:
        os.setpriority = real
        logging.getLogger("ringpipe").removeHandler(handler)
        del os.environ["RINGPIPE_COMM_THREAD_NICE"]
        thread_priority.comm_thread_nice.cache_clear()
    return [message for message in seen if "RINGPIPE_COMM_THREAD_NICE" in message]


@pytest.mark.timeout(60)
def test_an_explicit_nice_that_may_not_be_set_is_said_once(local_cluster):
    for said in local_cluster(2).run(refused_explicit_nice):
        assert len(said) == 1 and "RINGPIPE_COMM_THREAD_NICE=-5: not permitted here" in said[0]


def _can_raise_priority() -> bool:
    """Whether a thread of this process may take DEFAULT_NICE (CAP_SYS_NICE or
    RLIMIT_NICE: a container's root often has neither)."""
    import threading

    got = []
    thread = threading.Thread(target=lambda: got.append(thread_priority.apply(DEFAULT_NICE)))
    thread.start()
    thread.join()
    return got[0]


def test_a_compiler_started_from_the_channel_thread_runs_at_the_process_priority(tmp_path, monkeypatch):
    """The channel's thread builds the C helpers it first uses (an asynchronous collective opening a
    group's channel): the compiler, a child of that thread, must not inherit its raised priority."""
    import threading

    from ringpipe.runtime import c_library

    if not _can_raise_priority():
        pytest.skip("no permission to raise a thread's priority here")
    record = tmp_path / "nice"
    wrapper = tmp_path / "cc.sh"
    wrapper.write_text(f"#!/bin/sh\nawk '{{print $19}}' /proc/$$/stat > {record}\nexec cc \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("RINGPIPE_CACHE", str(tmp_path / "cache"))
    seen = []

    def build():
        thread_priority.apply(DEFAULT_NICE)
        c_library.build("stream_store", sources=["stream_store.c"])
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert int(record.read_text()) == os.getpriority(os.PRIO_PROCESS, os.getpid())
    assert seen == [DEFAULT_NICE]  # (the thread itself keeps its priority)

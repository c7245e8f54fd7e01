"""The group channel's thread runs its asynchronous collectives above the compute threads
(runtime/thread_priority.py): RINGPIPE_COMM_THREAD_NICE, its default, "off", and a bad value named."""
import os

import numpy as np
import pytest

from ringpipe.runtime import Cluster, RemoteError, thread_priority
from tests.test_runtime_env_setting import check_setting


def test_the_nice_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    check_setting(monkeypatch, "RINGPIPE_COMM_THREAD_NICE", thread_priority.comm_thread_nice,
                  thread_priority.comm_thread_nice.cache_clear,
                  [(None, thread_priority.DEFAULT_NICE), ("off", None), ("5", 5), ("-20", -20), ("19", 19)],
                  ["high", "-21", "20", "1.5"])


def priorities(comm):
    """(nice of the channel's thread, whether it was raised, nice of this main thread) after an
    asynchronous all_reduce ran there."""
    group = comm.new_group([0, 1])
    out = group.all_reduce(np.ones(1000), async_op=True).wait()
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
            assert nice == thread_priority.DEFAULT_NICE
        else:  # no CAP_SYS_NICE here: the thread keeps the process's priority
            assert os.geteuid() != 0 and nice == 0


@pytest.mark.timeout(60)
def test_off_leaves_the_thread_as_it_started_and_a_bad_value_fails_the_collective_that_opens_the_channel():
    with Cluster(2, env={"RINGPIPE_COMM_THREAD_NICE": "off"}) as cluster:
        for nice, raised, main in cluster.run(priorities):
            assert (nice, raised, main) == (0, True, 0)
    with Cluster(2, env={"RINGPIPE_COMM_THREAD_NICE": "urgent"}, timeout=10) as cluster:
        with pytest.raises(RemoteError, match="RINGPIPE_COMM_THREAD_NICE='urgent'"):
            cluster.run(priorities, timeout=30)

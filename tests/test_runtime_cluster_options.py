"""Cluster's options are checked before any worker starts (runtime/cluster_options.py)."""
import pytest

from ringpipe.runtime import Cluster

BAD_OPTIONS = [
    ({"arena_bytes": 10}, "arena_bytes=10"),
    ({"timeout": 0}, "timeout=0"),
    ({"timeout": -1}, "timeout=-1"),
    ({"timeout": float("nan")}, "timeout=nan"),
    ({"start_timeout": 0}, "start_timeout=0"),
    ({"stuck_grace": -1.0}, "stuck_grace=-1.0"),
    ({"threads_per_worker": 0}, "threads_per_worker=0"),
    ({"algorithm": "tree"}, "algorithm='tree'"),
    ({"shm": "yes"}, "shm='yes'"),
    ({"env": {"A": 1}}, "env="),
    ({"restart_count": -1}, "restart_count=-1"),
    ({"chunk_bytes": 0}, "chunk_bytes=0"),
    ({"round_byte": 1 << 20}, "round_byte=1048576 is unknown"),
    ({"heartbeat_interval": 5.0, "heartbeat_timeout": 2.0}, "heartbeat_interval=5.0"),
]


@pytest.mark.parametrize("options, named", BAD_OPTIONS, ids=[n for _, n in BAD_OPTIONS])
def test_a_cluster_option_out_of_range_raises_one_line_naming_it_before_any_worker_starts(options, named):
    with pytest.raises(ValueError) as raised:
        Cluster(2, **options)
    message = str(raised.value)
    assert f"Cluster option {named}" in message and "\n" not in message


@pytest.mark.parametrize("world_size", [0, -1, 1.5, "2"])
def test_world_size_must_be_a_positive_integer(world_size):
    with pytest.raises(ValueError, match=f"Cluster option world_size={world_size!r}.*integer at least 1"):
        Cluster(world_size)


def rank(comm):
    return comm.rank


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [0, -1])
def test_a_call_waited_for_with_a_timeout_not_above_zero_raises_naming_it(local_cluster, timeout):
    with pytest.raises(ValueError, match=f"timeout must be a positive number of seconds .*got {timeout}"):
        local_cluster(2).run(rank, timeout=timeout)

"""Actors and SPMD calls through the driver, and the public localhost test harness."""
import numpy as np
import pytest

from ringpipe.runtime import RemoteError
from ringpipe.runtime.testing import run_local


class Accumulator:
    """An actor: one instance per rank, holding state between calls and talking to its peers."""

    def __init__(self, comm, start):
        self.comm = comm
        self.total = np.full(3, float(start + comm.rank))

    def add(self, value):
        self.total += value
        return self.total

    def synced_total(self):
        self.comm.all_reduce(self.total)
        return self.total

    def fail(self):
        raise KeyError(f"no such entry on rank {self.comm.rank}")


def test_actor_methods_return_futures_with_one_result_per_rank(local_cluster):
    cluster = local_cluster(3)
    actors = cluster.spawn(Accumulator, 10)
    future = actors.add(1.0)
    assert [r.tolist() for r in future.result()] == [[11.0] * 3, [12.0] * 3, [13.0] * 3]
    assert [r.tolist() for r in actors.synced_total().result()] == [[36.0] * 3] * 3
    assert actors[1].add(0.5).result().tolist() == [36.5] * 3  # one rank: a single value


def test_actor_exceptions_carry_rank_and_remote_traceback(local_cluster):
    cluster = local_cluster(2)
    actors = cluster.spawn(Accumulator, 0)
    with pytest.raises(RemoteError) as info:
        actors.fail().result()
    assert info.value.rank == 0 and info.value.exc_type == "KeyError"
    assert "in fail" in info.value.remote_traceback and "no such entry on rank 0" in str(info.value)


def test_actors_on_chosen_ranks_only(local_cluster):
    cluster = local_cluster(3)
    actors = cluster.spawn(Accumulator, 0, ranks=[0, 2])
    assert [r.tolist() for r in actors.add(0.0).result()] == [[0.0] * 3, [2.0] * 3]
    with pytest.raises(IndexError):
        actors[1]


def rank_and_size(comm, offset, scale=1):
    return (comm.rank + offset) * scale, comm.size


def test_run_passes_args_and_kwargs_and_orders_results_by_rank(local_cluster):
    assert local_cluster(4).run(rank_and_size, 10, scale=2) == [[20, 4], [22, 4], [24, 4], [26, 4]]


def test_unsendable_arguments_fail_in_the_driver(local_cluster):
    with pytest.raises(TypeError, match="cannot be sent"):
        local_cluster(2).run(rank_and_size, object())


def test_run_local_starts_and_closes_its_own_cluster():
    assert run_local(rank_and_size, 2, 0) == [[0, 2], [1, 2]]

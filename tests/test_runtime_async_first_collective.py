"""A group's first collective opens its same-host channel (runtime/channel_regions.py:group_channel)
at the same number on every member, whether the collective is asynchronous or waited for there: any
mix of the two, in any order, gives the results of the all-waited case, an asynchronous call never
waits for the peers to arrive, and a failed opening raises on the handle, naming rank and peer."""
import numpy as np
import pytest

MIXES = {"waited everywhere": (), "async on rank 0": (0,), "async on rank 1": (1,), "async everywhere": (0, 1)}
OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier")


def first_collective(group, op, count, asynchronous):
    """`op` over `count` elements per rank on `group`, asynchronous or waited for; its result."""
    x = np.arange(2 * count, dtype=np.float32) * (group.rank + 1) + group.rank
    if op == "all_reduce":
        done = group.all_reduce(x, async_op=asynchronous)
    elif op == "all_gather":
        done = group.all_gather(x[:count], async_op=asynchronous)
    elif op == "reduce_scatter":
        done = group.reduce_scatter(x, async_op=asynchronous)
    elif op == "broadcast":
        done = group.broadcast(x, src=1, async_op=asynchronous)
    else:
        done = group.barrier(async_op=asynchronous)
    result = done.wait() if asynchronous else done
    return None if result is None else np.array(result).tolist()


def every_mix(comm, count):
    """Each op and mix on a fresh group (so it is the group's first collective), then a waited-for
    and an asynchronous collective of other shapes after it (a reordering would mismatch)."""
    results = {}
    for op in OPS:
        for mix, asynchronous in MIXES.items():
            group = comm.new_group([0, 1])
            first = first_collective(group, op, count, comm.rank in asynchronous)
            later = group.all_reduce(np.full(3, comm.rank + 1.0))
            gathered = group.all_gather(np.array([comm.rank, 7]), async_op=comm.rank in asynchronous)
            gathered = gathered.wait() if comm.rank in asynchronous else gathered
            opened = comm.engine.channels[group.group.gid].regions is not None
            results[f"{op}: {mix}"] = (first, later.tolist(), gathered.tolist(), opened)
            group.destroy()
    return results


@pytest.mark.timeout(90)
@pytest.mark.parametrize("count", [5, 70_000])  # one round on the latency path's sizes; several hundred KiB
def test_every_mix_of_asynchronous_and_waited_first_collectives_gives_the_all_waited_results(local_cluster, count):
    ranks = local_cluster(2).run(every_mix, count)
    for rank, results in enumerate(ranks):
        for case, (first, later, gathered, opened) in results.items():
            assert first == results[case.split(":")[0] + ": waited everywhere"][0], (rank, case)
            assert later == [3.0] * 3 and gathered == [0, 7, 1, 7] and opened, (rank, case)
    x = [np.arange(2 * count, dtype=np.float32) * (r + 1) + r for r in (0, 1)]
    assert ranks[0]["all_reduce: async on rank 0"][0] == (x[0] + x[1]).tolist()
    assert ranks[1]["reduce_scatter: async on rank 1"][0] == (x[0] + x[1])[count:].tolist()
    assert ranks[0]["broadcast: async on rank 1"][0] == x[1].tolist()
    assert ranks[1]["all_gather: async everywhere"][0] == np.concatenate([x[0][:count], x[1][:count]]).tolist()


def async_then_point_to_point(comm, peer_async):
    """Rank 0 posts its group's first collective asynchronously, then exchanges messages with rank 1,
    which reaches the collective only after rank 0's message came: rank 0's call must not wait."""
    group = comm.new_group([0, 1])
    x = np.full(6, comm.rank + 1.0)
    if comm.rank == 0:
        handle = group.all_reduce(x, async_op=True, timeout=10)
        comm.send(np.array([1.0]), 1)
        answer = comm.recv(1, timeout=10)
        handle.wait()
    else:
        answer = comm.recv(0, timeout=10) + 1
        comm.send(answer, 0)
        done = group.all_reduce(x, async_op=peer_async, timeout=10)
        done.wait() if peer_async else None
    group.destroy()
    return x.tolist(), answer.tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peer_async", [False, True])
def test_an_asynchronous_first_collective_lets_its_caller_serve_a_peer_before_that_arrives(local_cluster,
                                                                                             peer_async):
    for values, answer in local_cluster(2).run(async_then_point_to_point, peer_async):
        assert values == [3.0] * 6 and answer == [2.0]


def opening_without_the_peer(comm):
    """On one group rank 0, on another rank 1, makes the group's first collective asynchronously
    and the other member never calls it: what the handle raises."""
    errors = []
    for alone in (0, 1):
        group = comm.new_group([0, 1])
        if comm.rank == alone:
            try:
                group.all_reduce(np.ones(4), async_op=True, timeout=0.5).wait()
            except Exception as exc:  # noqa: BLE001 - the test looks at what it was
                errors.append(f"{type(exc).__name__}: {exc}")
        comm.barrier()  # (the other keeps the group meanwhile: one that destroyed it would be named so)
        group.destroy()
    return errors


@pytest.mark.timeout(60)
def test_an_asynchronous_first_collective_whose_peer_never_comes_times_out_naming_it(local_cluster):
    cluster = local_cluster(2)
    for rank, errors in enumerate(cluster.run(opening_without_the_peer)):
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert errors[0].startswith("CommTimeout: all_reduce (opening the same-host channel)"), errors
        assert f"on rank {rank} timed out after 0.5s waiting for a message from rank {1 - rank}" in errors[0]
    assert cluster.run(async_then_point_to_point, True) == [[[3.0] * 6, [2.0]]] * 2  # the cluster goes on


def mix_without_a_channel(comm):
    group = comm.new_group(range(comm.size))
    x = np.full(4, comm.rank + 1.0)
    done = group.all_reduce(x, async_op=comm.rank == 0)
    done.wait() if comm.rank == 0 else None
    return x.tolist(), group.group.gid in comm.engine.channels


@pytest.mark.timeout(60)
def test_a_group_without_shared_memory_runs_a_mixed_first_collective_on_the_engine(local_cluster):
    # (as a group spanning hosts does: no member opens a channel, asynchronous or not)
    assert local_cluster(3, shm=False).run(mix_without_a_channel) == [[[6.0] * 4, False]] * 3


class KeepsGroup:
    """A group kept across calls: its first collective, asynchronous on rank 0, is left unwaited
    (cancelled as the call ends, before or after the opening exchange went round)."""

    def __init__(self, comm):
        self.comm, self.group = comm, comm.new_group([0, 1])

    def leave_first(self):
        if self.comm.rank == 0:
            self.group.all_reduce(np.ones(4), async_op=True)

    def use(self, asynchronous_rank):
        x = np.full(5, self.comm.rank + 1.0)
        done = self.group.all_reduce(x, async_op=self.comm.rank == asynchronous_rank)
        done.wait() if self.comm.rank == asynchronous_rank else None
        return x.tolist(), self.comm.engine.channels[self.group.group.gid].regions is not None


@pytest.mark.timeout(60)
def test_a_group_whose_asynchronous_first_collective_was_cancelled_opens_at_its_next_one(local_cluster):
    actors = local_cluster(2).spawn(KeepsGroup)
    actors.leave_first().result(timeout=30)
    for asynchronous_rank in (1, 0, None):
        for values, opened in actors.use(asynchronous_rank).result(timeout=30):
            assert values == [3.0] * 5 and opened


class AbortedWhileOpening:
    """Rank 0 makes a kept group's first collective asynchronously; rank 1's call fails meanwhile."""

    def __init__(self, comm):
        self.comm, self.group, self.seen = comm, comm.new_group([0, 1]), None

    def fail_while_opening(self):
        if self.comm.rank == 1:
            raise ValueError("rank 1 gives up")
        try:
            self.group.all_reduce(np.ones(4), async_op=True, timeout=20).wait()
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            self.seen = f"{type(exc).__name__}: {exc}"
            raise

    def seen_and_sum(self):
        x = np.full(5, self.comm.rank + 1.0)
        self.group.all_reduce(x)
        return self.seen, x.tolist()


@pytest.mark.timeout(60)
def test_an_abort_while_an_asynchronous_first_collective_opens_raises_on_its_handle(local_cluster):
    from ringpipe.runtime import RemoteError

    actors = local_cluster(2).spawn(AbortedWhileOpening)
    with pytest.raises(RemoteError, match="rank 1 gives up"):
        actors.fail_while_opening().result(timeout=30)
    (seen, values), (nothing, same) = actors.seen_and_sum().result(timeout=30)
    assert seen.startswith("Aborted: ") and "\n" not in seen and "rank 1" in seen, seen
    assert nothing is None and values == same == [3.0] * 5  # (and the group opens at its next collective)


def no_room_then_async_first(comm):
    """Groups that each take a channel until the arenas have no room left, then a group whose first
    collective is asynchronous on rank 0 only: it keeps to the engine's algorithms, in order."""
    kept = []
    while len(kept) < 16 and (not kept or comm.engine.channels[kept[-1].group.gid] is not None):
        kept.append(comm.new_group([0, 1]))
        kept[-1].barrier()
    group = comm.new_group([0, 1])
    x = np.arange(6, dtype=np.float32) + comm.rank
    handle = group.all_reduce(x, async_op=comm.rank == 0)
    handle.wait() if comm.rank == 0 else None
    later = group.all_gather(np.array([comm.rank]), async_op=comm.rank == 0)
    later = later.wait() if comm.rank == 0 else later
    channel = comm.engine.channels.get(group.group.gid, "absent")
    for each in kept + [group]:
        each.destroy()
    return x.tolist(), later.tolist(), channel is None or channel.regions is None


@pytest.mark.timeout(60)
def test_an_asynchronous_first_collective_of_a_group_without_room_for_a_channel_takes_the_engine(local_cluster):
    for values, gathered, no_channel in local_cluster(2, arena_bytes=1 << 20).run(no_room_then_async_first):
        assert values == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0] and gathered == [0, 1] and no_channel

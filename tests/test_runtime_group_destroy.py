"""A group's life (runtime/group_state.py, runtime/channel_regions.py): a destroyed group, or one
whose communicators are all garbage, gives its same-host channel's arena region back once the group
is gone on every member; until then a member keeps its region (peers may still read it), and a
collective that waits on a member that destroyed the group fails at once with GroupDestroyed."""
import gc
import logging
import threading
import time

import numpy as np
import pytest

from ringpipe.runtime import GroupDestroyed, RemoteError
from ringpipe.runtime.shm import Arena
from ringpipe.runtime.shm_collectives import SMALL_BYTES

SMALL_ARENA = 1 << 20  # room for a handful of channels (each region is an eighth of the arena)


def _wait_until(done, seconds: float = 20.0) -> bool:
    """Whether `done()` became true within `seconds` (the peers' "closed" notes come over the engine,
    maybe after the call that closed the group on every member returned)."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    return done()


def _quiet(comm):
    """Every rank, once the groups earlier tests dropped on this pooled cluster are given back (and
    the ring blocks that come back lazily are back: no hole grows under a test)."""
    comm.barrier()
    _wait_until(lambda: not comm.engine.regions.closed_here)
    if comm.engine.rings is not None:
        comm.engine.rings.reclaim()
    comm.barrier()


# ---- the arena ------------------------------------------------------------------------------------
def test_an_unpinned_block_goes_back_to_the_arena(tmp_path):
    arena = Arena(str(tmp_path / "arena"), 1 << 16)
    try:
        pinned = arena.pin(4096)
        assert arena.largest_free() == (1 << 16) - 4096
        assert arena.unpin(pinned) and not arena.unpin(pinned)
        assert arena.largest_free() == 1 << 16 and arena.pin(4096) == pinned
    finally:
        arena.close()


# ---- many groups on one cluster ---------------------------------------------------------------------
def _channel_threads() -> int:
    return sum(t.name.startswith("ringpipe-channel-") for t in threading.enumerate())


def make_and_drop_groups(comm, count):
    _quiet(comm)  # (which opens the world group's own channel: it stays)
    engine, arena = comm.engine, comm.engine.arena
    pinned, listeners, threads = set(arena._pinned), len(engine.abort_listeners), _channel_threads()
    opened = 0
    for i in range(count):
        group = comm.new_group([0, 1])
        group.all_reduce(np.ones(4))  # opens its channel
        opened += engine.channels.get(group.group.gid) is not None
        if i % 3 == 0:
            group.all_reduce(np.ones(4), async_op=True).wait()  # on the channel's own thread
        if i % 2:
            group.destroy()
        del group  # the others go as garbage
    comm.barrier()
    _wait_until(lambda: set(arena._pinned) <= pinned and _channel_threads() <= threads)
    return (opened, len(set(arena._pinned) - pinned), len(engine.abort_listeners) - listeners,
            _channel_threads() - threads)


@pytest.mark.timeout(120)
def test_a_hundred_groups_made_and_dropped_on_one_cluster_each_get_a_channel_and_give_it_back(local_cluster):
    # 1 GiB arenas hold ~31 channel regions: without giving them back the 32nd group had none
    for opened, left_pinned, left_listeners, left_threads in local_cluster(2).run(make_and_drop_groups, 100):
        assert opened == 100 and left_pinned == 0 and left_listeners == 0 and left_threads == 0


def group_in_a_cycle(comm):
    """A group that only a reference cycle holds once the call returns (as a mesh or a trainer's
    objects often do), with automatic collection off, so that only the end of the call frees it."""
    gc.disable()
    group = comm.new_group([0, 1])
    group.all_reduce(np.ones(4), timeout=60)  # opens its channel: a region in each member's arena
    cycle = [group]
    cycle.append(cycle)
    return comm.engine.regions.offsets.get(group.group.gid) is not None


def enable_automatic_collection(comm):
    gc.enable()


@pytest.mark.timeout(120)
def test_groups_a_call_leaves_in_reference_cycles_are_given_back_when_it_ends(local_cluster):
    cluster = local_cluster(2)
    try:
        got_a_channel = [all(cluster.run(group_in_a_cycle)) for _ in range(40)]  # 31 regions fill the arena
    finally:
        cluster.run(enable_automatic_collection)
    assert all(got_a_channel), got_a_channel.index(False)


def group_then_raise(comm):
    group = comm.new_group([0, 1])
    group.barrier()
    if comm.rank == 1:
        raise ValueError("on purpose, with the group open")
    group.all_reduce(np.ones(4), timeout=60)  # only the abort ends it


def regions_held(comm):
    _quiet(comm)
    return sorted(comm.engine.regions.offsets)


def regions_left(comm, before):
    """The regions held once those of groups made since `before` were given back (or 20 s passed)."""
    _quiet(comm)
    regions = comm.engine.regions
    _wait_until(lambda: set(regions.offsets) <= set(before[comm.rank]))
    return sorted(regions.offsets)


@pytest.mark.timeout(120)
def test_the_groups_of_an_aborted_call_are_given_back(local_cluster):
    cluster = local_cluster(2)
    before = cluster.run(regions_held)  # groups earlier tests keep alive on this pooled cluster stay
    with pytest.raises(RemoteError, match="on purpose"):
        cluster.run(group_then_raise)
    assert cluster.run(regions_left, before) == before


def region_of_a_group_then_of_the_next(comm):
    _quiet(comm)
    regions = comm.engine.regions
    first = comm.new_group([0, 1])
    first.barrier()
    offset = regions.offsets[first.group.gid]
    first.destroy()
    comm.barrier()
    _wait_until(lambda: first.group.gid not in regions.offsets)
    second = comm.new_group([0, 1])
    second.barrier()
    return offset, regions.offsets[second.group.gid]


@pytest.mark.timeout(60)
def test_a_destroyed_groups_region_is_taken_by_the_next_group(local_cluster):
    for first, second in local_cluster(2).run(region_of_a_group_then_of_the_next):
        assert first == second


def destroy_on_rank_0_only_then_on_rank_1(comm):
    regions = comm.engine.regions
    group = comm.new_group([0, 1])
    group.barrier()
    gid = group.group.gid
    if comm.rank == 0:
        group.destroy()
    comm.barrier()
    time.sleep(0.2)  # time for rank 0's note; rank 1 still holds the group
    held = gid in regions.offsets
    comm.barrier()
    if comm.rank == 1:
        group.destroy()
    comm.barrier()
    return held, not _wait_until(lambda: gid not in regions.offsets)


@pytest.mark.timeout(60)
def test_a_member_keeps_its_region_until_every_member_destroyed_the_group(local_cluster):
    (held_0, left_0), (held_1, left_1) = local_cluster(2).run(destroy_on_rank_0_only_then_on_rank_1)
    assert held_0 and held_1  # rank 1 may still read rank 0's region: rank 0 keeps it
    assert not left_0 and not left_1


def many_asynchronous_collectives(comm, count):
    comm.barrier()  # the channel open: the asynchronous ones run on its thread
    for _ in range(count):
        comm.all_gather(np.ones(1000), async_op=True).wait()
    return len(comm.engine._call_handles)


@pytest.mark.timeout(60)
def test_a_call_keeps_no_record_of_its_finished_asynchronous_collectives(local_cluster):
    # each handle holds its result: a long call of many used to keep them all
    assert max(local_cluster(2).run(many_asynchronous_collectives, 600)) <= 256


# ---- using a destroyed group ------------------------------------------------------------------------
def collective_after_the_peer_destroyed(comm, elements):
    group = comm.new_group([0, 1])
    group.barrier()  # opens the channel
    if comm.rank == 0:
        group.destroy()
        comm.barrier()
        return None
    comm.barrier()
    try:
        group.all_reduce(np.ones(elements, np.float32), timeout=60)
    except GroupDestroyed as exc:
        return str(exc)
    finally:
        group.destroy()
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("elements", [4, 2 * SMALL_BYTES], ids=["latency-path", "python-path"])
def test_a_collective_waiting_on_a_member_that_destroyed_the_group_fails_naming_it(local_cluster, elements):
    message = local_cluster(2).run(collective_after_the_peer_destroyed, elements)[1]
    assert "all_reduce" in message and "rank 0 destroyed group w/0,1#" in message, message


def engine_collective_after_the_peer_destroyed(comm, how):
    group = comm.new_group([0, 1])  # its channel never opens on rank 0
    if comm.rank == 0:
        group.destroy()
        return None
    try:
        if how == "opening":
            group.barrier(timeout=60)  # the channel's opening: a message round over the engine
        else:
            group.all_reduce(np.ones(3), async_op=True, timeout=60).wait()  # no channel yet: the engine's
    except GroupDestroyed as exc:
        return str(exc)
    finally:
        group.destroy()
    return "no error"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["opening", "asynchronous"])
def test_an_engine_collective_waiting_on_a_member_that_destroyed_the_group_fails_naming_it(local_cluster, how):
    message = local_cluster(2).run(engine_collective_after_the_peer_destroyed, how)[1]
    assert "rank 0 destroyed" in message and "w/0,1#" in message, message


def every_use_of_a_destroyed_group(comm):
    group = comm.new_group([0, 1])
    other = group.using(algorithm="ring")
    group.send(np.ones(2), 1 - comm.rank)  # a message of this kind known: the fast path would take the next
    group.recv(1 - comm.rank)
    group.destroy()
    group.destroy()  # a second time: nothing
    errors = []
    for use in (lambda: group.all_reduce(np.ones(3)), lambda: other.barrier(), lambda: group.send(np.ones(2), 1),
                lambda: group.recv(1), lambda: group.irecv(1), lambda: group.new_group([0])):
        try:
            use()
        except GroupDestroyed as exc:
            errors.append(str(exc))
    try:
        comm.destroy()
    except ValueError as exc:
        errors.append(str(exc))
    return errors


@pytest.mark.timeout(60)
def test_every_operation_on_a_destroyed_group_raises_and_the_world_group_cannot_be_destroyed(local_cluster):
    for rank, errors in enumerate(local_cluster(2).run(every_use_of_a_destroyed_group)):
        assert len(errors) == 7, errors
        assert all(f"was destroyed on rank {rank}" in e for e in errors[:6]), errors
        assert errors[6] == f"destroy: rank {rank} cannot destroy the world group"


def small_collectives_right_after_destroy(comm):
    """A group whose channel took small collectives (the latency path, runtime/shm_small.py), destroyed
    while the engine thread, which closes the channel, is still busy; then every small collective."""
    group = comm.new_group([0, 1])
    group.all_reduce(np.ones(3))  # opens the channel; the next ones take its latency path
    group.barrier()
    busy = threading.Event()
    comm.engine.call_soon(lambda: busy.wait(10))  # the channel's close queues behind this
    try:
        group.destroy()
        errors = []
        for use in (lambda: group.all_reduce(np.ones(3)), lambda: group.barrier(),
                    lambda: group.all_gather(np.ones(3)), lambda: group.broadcast(np.ones(3), 0),
                    lambda: group.reduce_scatter(np.ones(4))):
            try:
                use()
                errors.append("ran")
            except GroupDestroyed as exc:
                errors.append(str(exc))
        return errors
    finally:
        busy.set()


@pytest.mark.timeout(60)
def test_a_small_collective_on_a_destroyed_group_raises_before_its_channel_is_closed(local_cluster):
    for rank, errors in enumerate(local_cluster(2).run(small_collectives_right_after_destroy)):
        assert len(errors) == 5 and all(f"was destroyed on rank {rank}" in e for e in errors), errors


def nccl_groups_destroyed(comm):
    from tests.test_nccl_communicator import nccl_over

    whole, _ = nccl_over(comm)
    pair = whole.new_group([0, 1])
    pair.destroy()
    whole.destroy()
    return pair.control._sequence.destroyed is not None, whole.control._sequence.destroyed is None


@pytest.mark.timeout(60)
def test_an_nccl_group_takes_the_control_group_it_made_along_but_not_one_handed_in(local_cluster):
    assert local_cluster(2).run(nccl_groups_destroyed) == [[True, True], [True, True]]


# ---- a full arena -----------------------------------------------------------------------------------
def groups_until_no_room(comm):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ringpipe.runtime")
    logger.addHandler(handler)
    kept = []
    try:
        while len(kept) < 16:
            group = comm.new_group(range(comm.size))
            group.barrier()
            kept.append(group)
            if comm.engine.channels[group.group.gid] is None:
                break
    finally:
        logger.removeHandler(handler)
        for group in kept:
            group.destroy()
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    return comm.engine.channels.get(kept[-1].group.gid, "closed"), warnings


@pytest.mark.timeout(60)
def test_a_group_without_room_for_its_channel_says_so_in_one_warning(local_cluster):
    for last, warnings in local_cluster(3, arena_bytes=SMALL_ARENA).run(groups_until_no_room):
        assert last in (None, "closed")
        assert len(warnings) == 1 and "no room for group w/0,1,2#" in warnings[0], warnings
        assert "engine's slower path" in warnings[0] and "destroy()" in warnings[0]


class GroupHolder:
    """An actor holding a group whose channel opened (as a ParallelTrainer holds its mesh)."""

    def __init__(self, comm):
        self.group = comm.new_group([0, 1])
        self.group.all_reduce(np.ones(4), timeout=60)

    def gid(self):
        return self.group.group.gid


def holds_region(comm, gid, wait: bool):
    _quiet(comm)
    if wait:
        _wait_until(lambda: gid not in comm.engine.regions.offsets)
    return gid in comm.engine.regions.offsets


@pytest.mark.timeout(120)
def test_an_actor_no_handle_refers_to_is_dropped_with_the_next_call_and_gives_its_groups_back(local_cluster):
    cluster = local_cluster(2)
    holder = cluster.spawn(GroupHolder)
    gid = holder.gid().result()[0]
    one_rank = holder[0]
    del holder
    assert cluster.run(holds_region, gid, False) == [True, True]  # `one_rank` still refers to the actor
    del one_rank
    assert cluster.run(holds_region, gid, True) == [False, False]  # dropped before this call ran

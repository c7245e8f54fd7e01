"""Same-host point-to-point over the pair rings (runtime/shm_p2p.py), in one process over two real
arenas: large messages go in parts through arena blocks, which come back to the sender through
shared memory (the receiver passing their slots), never through a message."""
import threading
import time
import types

import numpy as np
import pytest

from ringpipe.runtime.shm import Arena
from ringpipe.runtime.shm_p2p import PART_BYTES, PairRings

ARENA = 8 << 20  # rings take a quarter; about 6 MiB are left for the blocks of large messages


def two_ranks_of_rings(tmp_path):
    """Rank 0's and rank 1's PairRings in this process, over two real arenas (no cluster). The
    engines have no `send`: a ring that sent a ZeroMQ message would raise AttributeError."""
    arenas = [Arena(str(tmp_path / f"arena{r}"), ARENA) for r in (0, 1)]
    engines = [types.SimpleNamespace(rank=r, arena=arenas[r], epoch=0, call=1, aborted_call=None, shm_peers={1 - r},
                                     peer_arenas={1 - r: arenas[1 - r]}, timed_out_on=set(), needs_fence=False,
                                     count_sent=lambda group, nbytes: None) for r in (0, 1)]
    rings = []
    for engine in engines:
        ring_bytes = PairRings.pin(engine.arena, 2)
        rings.append(PairRings(engine, 2, ring_bytes))
    return arenas, rings


def receive(rings, src, key):
    ticket = rings.post(src, key)
    return rings.take(src, key, ticket, time.monotonic() + 10, "recv", 10.0)[0]


def blocks_in_use(arena) -> int:
    return len(arena._used)  # pinned rings are not counted


def test_a_ring_drops_a_message_its_sender_gave_up_part_way_and_delivers_the_next(tmp_path):
    arenas, (rank0, rank1) = two_ranks_of_rings(tmp_path)
    try:
        key = (1, "w", 7)
        # Part 0 of 3 of a message whose sender was then aborted, then a whole message.
        whole = rank1._describe("w", np.zeros(6), "send")  # what a message of 6 float64 says of itself
        rank1._send_part(rank1._ring(1, 0), 0, [0, 1, 7, whole, 0, 3], np.arange(2.0).view(np.uint8), True,
                         time.monotonic() + 5, "send", 5.0)
        rank1.send(0, key, np.array([42.0, 43.0]), "send", 5.0)
        assert receive(rank0, 1, key).tolist() == [42.0, 43.0]
    finally:
        for arena in arenas:
            arena.close()


def test_a_large_message_goes_in_parts_whose_blocks_return_to_the_sender_once_read(tmp_path):
    arenas, (rank0, rank1) = two_ranks_of_rings(tmp_path)
    try:
        message = np.arange(3 * PART_BYTES // 8 + 5, dtype=np.float64)  # 4 parts
        rank1.send(0, (1, "w", 0), message, "send", 5.0)
        assert blocks_in_use(arenas[1]) == 4  # the receiver has not read them yet
        assert np.array_equal(receive(rank0, 1, (1, "w", 0)), message)
        rank1.reclaim()
        assert blocks_in_use(arenas[1]) == 0
    finally:
        for arena in arenas:
            arena.close()


def test_a_sender_whose_arena_is_full_goes_on_as_its_receiver_reads(tmp_path):
    arenas, (rank0, rank1) = two_ranks_of_rings(tmp_path)
    try:
        messages = [np.full(PART_BYTES // 8, float(i)) for i in range(16)]  # 16 MiB through ~6 MiB of arena
        errors = []

        def send_all():
            try:
                for message in messages:
                    rank1.send(0, (1, "w", 0), message, "send", 10.0)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        sender = threading.Thread(target=send_all)
        sender.start()
        got = [receive(rank0, 1, (1, "w", 0)) for _ in messages]
        sender.join(10)
        assert not errors and not sender.is_alive()
        assert all(np.array_equal(a, b) for a, b in zip(got, messages))
    finally:
        for arena in arenas:
            arena.close()


def test_blocks_taken_before_an_arena_reset_are_not_freed_again(tmp_path):
    arenas, (rank0, rank1) = two_ranks_of_rings(tmp_path)
    try:
        rank1.send(0, (1, "w", 0), np.ones(PART_BYTES // 8), "send", 5.0)
        arenas[1].reset()  # an abort: every block is free again, and taken anew below
        taken = arenas[1].alloc(PART_BYTES)
        receive(rank0, 1, (1, "w", 0))  # passes the slot of the block from before the reset
        rank1.reclaim()
        assert taken in arenas[1]._used
    finally:
        for arena in arenas:
            arena.close()


def held_blocks_then_engine_collective(comm):
    """Rank 0 sends 2.5 MiB over the ring before rank 1 reads any of it: three blocks of its 4 MiB
    arena (a quarter holds the rings) stay taken until rank 0 looks again. Then a collective on the
    engine's shared-memory algorithm needs more room than is left."""
    if comm.rank == 0:
        comm.send(np.ones((5 << 20) // 16), 1)
    else:
        time.sleep(0.3)
        comm.recv(0)
    group = comm.new_group([0, 1]).using(algorithm="shm")  # no channel yet: an async op runs on the engine
    x = np.full((3 << 20) // 16, float(comm.rank + 1))
    group.all_reduce(x, async_op=True, timeout=15).wait()
    return bool(np.all(x == 3.0))


@pytest.mark.timeout(120)
def test_the_engine_takes_back_ring_blocks_already_read_when_its_arena_is_full(local_cluster):
    cluster = local_cluster(2, arena_bytes=4 << 20)
    assert cluster.run(held_blocks_then_engine_collective, timeout=60) == [True, True]

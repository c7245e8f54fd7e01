"""Buffers larger than the shared-memory arena still move (in rounds, or over ZeroMQ), for every
operation that uses the arena."""
import numpy as np
import pytest

from tests.conftest import arena_blocks_in_use

ARENA = 4 << 20
MiB = 1 << 20


def payload(rank, nbytes, dtype):
    return ((np.arange(nbytes // np.dtype(dtype).itemsize) * 7 + rank * 13) % 251).astype(dtype)


def big_collective(comm, kind, nbytes, dtype):
    comm = comm.using(algorithm="shm")
    x = payload(comm.rank, nbytes, dtype)
    if kind == "broadcast":
        comm.broadcast(x, src=comm.size - 1, timeout=30)
        return bool(np.array_equal(x, payload(comm.size - 1, nbytes, dtype)))
    if kind == "all_gather":
        out = comm.all_gather(x, timeout=30)
        return bool(np.array_equal(out, np.concatenate([payload(r, nbytes, dtype) for r in range(comm.size)])))
    if kind == "reduce_scatter":
        rows = x.reshape(comm.size, -1)
        mine = comm.reduce_scatter(rows, timeout=30)
        total = sum(payload(r, nbytes, dtype).reshape(comm.size, -1) for r in range(comm.size))
        return bool(np.array_equal(mine, total[comm.rank : comm.rank + 1]))
    comm.all_reduce(x, timeout=30)
    return bool(np.array_equal(x, sum(payload(r, nbytes, dtype) for r in range(comm.size))))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, nbytes, dtype", [
    ("broadcast", 9 * MiB + 3, "uint8"),       # the reported case, shrunk: 2.25 arenas, not a multiple of rounds
    ("all_gather", 8 * MiB + 24, "float64"),   # each rank's piece alone is twice the arena
    ("reduce_scatter", 12 * MiB, "float32"),   # three rows of 4 MiB
    ("all_reduce", 10 * MiB, "int64"),
])
def test_collectives_larger_than_the_arena_deliver(local_cluster, kind, nbytes, dtype):
    cluster = local_cluster(3, arena_bytes=ARENA)
    assert cluster.run(big_collective, kind, nbytes, dtype, timeout=90) == [True] * 3
    assert cluster.run(arena_blocks_in_use) == [0, 0, 0]


def big_send(comm, nbytes):
    if comm.rank == 0:
        comm.send(payload(0, nbytes, "float32"), 1, timeout=30)
        return True
    if comm.rank == 1:
        return bool(np.array_equal(comm.recv(0, timeout=30), payload(0, nbytes, "float32")))
    return None


@pytest.mark.timeout(120)
def test_a_send_larger_than_the_arena_delivers(local_cluster):
    cluster = local_cluster(3, arena_bytes=ARENA)
    assert cluster.run(big_send, 12 * MiB, timeout=90) == [True, True, None]
    assert cluster.run(arena_blocks_in_use) == [0, 0, 0]

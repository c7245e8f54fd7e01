"""`sendrecv` (runtime/shm_p2p_single_copy.py): between same-host ranks a large message is read by
its receiver straight from the sender's array (one copy), with the bits of the plain path; a
receiver that cannot read makes its sender send a copy. (The probe itself, a real EPERM and
`RINGPIPE_CMA=0` included: tests/test_runtime_shm_cma.py.)"""
import numpy as np
import pytest

from ringpipe.runtime import Cluster, cma
from ringpipe.runtime.shm_p2p_single_copy import MIN_BYTES, sendrecv

pytestmark = pytest.mark.skipif(not cma.available(), reason="this libc has no process_vm_readv")


@pytest.fixture(scope="module")
def three():
    with Cluster(3, threads_per_worker=1) as cluster:
        yield cluster


def payload(rank: int, dtype) -> np.ndarray:
    values = np.random.default_rng(rank).standard_normal(MIN_BYTES // 2 + 5) * 1e3
    return values.astype(dtype)


def ring_shift(comm, dtype, readers_off, with_out):
    """Every rank sends its payload to the next and receives the previous one's; the ranks in
    `readers_off` cannot read from other processes (as under a strict Yama ptrace_scope)."""
    single = comm.engine.rings.single_copy
    single.on = comm.rank not in readers_off
    single.verified.clear()
    single.refused.clear()
    try:
        n, rank = comm.size, comm.rank
        x = payload(rank, dtype)
        out = np.empty_like(x) if with_out else None
        got = sendrecv(comm, x, (rank + 1) % n, (rank - 1) % n, tag=4, out=out)
        assert out is None or got is out
        return got, sorted(single.verified), sorted(single.refused)
    finally:
        single.on = True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "complex64"])
def test_a_ring_shift_reads_each_array_once_with_the_plain_paths_bits(three, dtype):
    for with_out in (True, False):
        results = three.run(ring_shift, dtype, [], with_out, timeout=60)
        for rank, (got, verified, refused) in enumerate(results):
            expected = payload((rank - 1) % 3, dtype)
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()
            assert verified == [(rank - 1) % 3] and refused == []  # read from the sender itself


@pytest.mark.timeout(120)
def test_a_receiver_that_cannot_read_gets_a_copy_and_its_sender_sends_copies_from_then_on(three):
    results = three.run(ring_shift, "float32", [1], True, timeout=60)
    for rank, (got, verified, refused) in enumerate(results):
        assert got.tobytes() == payload((rank - 1) % 3, np.float32).tobytes()
    assert results[0][2] == [1] and results[1][1] == []  # rank 0 sent rank 1 a copy; rank 1 read nothing


@pytest.mark.timeout(120)
def test_with_single_copy_off_everywhere_the_plain_path_delivers_the_same_bits(three):
    results = three.run(ring_shift, "float64", [0, 1, 2], True, timeout=60)
    for rank, (got, verified, refused) in enumerate(results):
        assert got.tobytes() == payload((rank - 1) % 3, np.float64).tobytes() and verified == refused == []


def two_of_three_exchange(comm):
    pair = comm.new_group([0, 1])
    if pair is None:
        return None
    x = payload(comm.rank, np.float32)
    got = sendrecv(pair, x, 1 - pair.rank, 1 - pair.rank, tag=9)
    return got.tobytes() == payload(1 - comm.rank, np.float32).tobytes()


@pytest.mark.timeout(120)
def test_two_ranks_exchange_with_each_other_in_a_subgroup(three):
    assert three.run(two_of_three_exchange, timeout=60) == [True, True, None]


def sendrecv_nobody_answers(comm):
    if comm.rank != 0:
        return None
    try:
        sendrecv(comm, payload(0, np.float32), 1, 2, timeout=0.5)
    except TimeoutError as exc:
        return str(exc)


@pytest.mark.timeout(120)
def test_a_sendrecv_nobody_answers_times_out_naming_rank_and_peer(three):
    message = three.run(sendrecv_nobody_answers, timeout=60)[0]
    assert "on rank 0 timed out after 0.5s" in message and ("rank 1" in message or "rank 2" in message), message


"""The latency path for small collectives (runtime/shm_small.py, csrc/shm_small.c): one call into C per
round, with the same results, errors, aborts and trace spans as the Python rounds it stands in for."""
import re
import time

import numpy as np
import pytest

from ringpipe.runtime import RemoteError
from ringpipe.runtime.operations import CollectiveMismatch
from ringpipe.runtime.shm_wait import unavailable_reason
from tests.test_runtime_shm_channel import alone_after_open  # rank 1 waits alone on the open channel

pytestmark = pytest.mark.skipif(unavailable_reason("c") is not None, reason=f"no C helper: {unavailable_reason('c')}")

DTYPES = ["float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]


def rank_input(dtype, rank):
    """Values that overflow integer sums (which wrap) and hold NaN and signed zeros for floats."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        return np.array([info.max - rank, info.min + rank, rank, 3 - rank * 2 if info.min < 0 else rank * 7],
                        dtype)
    zero, other = (0.0, -0.0) if rank == 0 else (-0.0, 0.0)  # max/min of +0 and -0: NumPy's pick
    return np.array([np.nan if rank == 1 else 1.5, -0.0, 1e30 * (rank + 1), 0.1 * rank, zero, other], dtype)


def in_rank_order(inputs, op):
    """What every rank must get: ((x0 op x1) op x2) ..., as NumPy computes it."""
    reduce = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum}[op]
    with np.errstate(over="ignore", invalid="ignore"):
        total = reduce(inputs[0], inputs[1])
        for x in inputs[2:]:
            total = reduce(total, x)
        return total / len(inputs) if op == "avg" else total


def reduce_every_dtype(comm):
    comm.barrier()  # opens the channel: what follows may take the latency path
    results = []
    for dtype in DTYPES:
        for op in ("sum", "max", "min") + (("avg",) if dtype.startswith("float") else ()):
            x = rank_input(dtype, comm.rank)
            with np.errstate(over="ignore", invalid="ignore"):
                comm.all_reduce(x, op=op)
            results.append((dtype, op, x.tobytes()))
    channel = comm.engine.channels[comm.group.gid]
    return results, channel.small is not None


@pytest.mark.timeout(120)
def test_a_small_all_reduce_gives_numpys_rank_order_bits_for_every_dtype_and_op(local_cluster):
    per_rank = local_cluster(3).run(reduce_every_dtype)
    assert all(used for _, used in per_rank)  # the C path ran
    for index, (dtype, op, _) in enumerate(per_rank[0][0]):
        want = in_rank_order([rank_input(dtype, r) for r in range(3)], op).astype(dtype)
        for results, _ in per_rank:
            assert results[index][2] == want.tobytes(), (dtype, op)


def mixed_paths(comm):
    comm.barrier()
    base = np.arange(6, dtype=np.float64) + comm.rank
    # Rank 1's arrays are not contiguous, so it runs the Python rounds; rank 0 the latency path.
    fresh = (lambda values: np.repeat(values, 2)[::2]) if comm.rank == 1 else np.array
    out = fresh(np.zeros(6))
    if comm.rank == 1:
        out[...] = base
    comm.broadcast(out, 1)
    largest, total = comm.all_reduce(fresh(base), op="max"), comm.all_reduce(fresh(base))
    return out.tolist(), total.tolist(), largest.tolist(), comm.engine.channels[comm.group.gid].small is not None


@pytest.mark.timeout(60)
def test_ranks_on_the_latency_path_and_on_the_python_path_meet_in_one_round(local_cluster):
    base = np.arange(6, dtype=np.float64)
    for out, total, largest, fast in local_cluster(2).run(mixed_paths):
        assert fast and out == (base + 1).tolist()
        assert total == (2 * base + 1).tolist() and largest == (base + 1).tolist()


def signed_nans(negative, payload: int) -> np.ndarray:
    """67 float32 NaNs (a vector loop's body and its tail) with `payload`, negative at `negative`."""
    x = np.full(67, np.nan, np.float32)
    bits = x.view(np.uint32)
    bits += payload
    bits[negative] |= 1 << 31
    return x


def nan_sums(comm):
    """Sums of NaNs of both signs and other payloads on each rank: both on the latency path, then
    rank 1 on the Python round (a non-contiguous array), then asynchronous on rank 0 only (the
    channel thread's Python round); what each rank got, in bytes."""
    x = signed_nans(slice(comm.rank, None, 2), 5 + 4 * comm.rank)
    comm.barrier()
    got = [comm.all_reduce(x.copy()).tobytes()]
    mixed = np.repeat(x, 2)[::2] if comm.rank == 1 else x.copy()
    got.append(np.ascontiguousarray(comm.all_reduce(mixed)).tobytes())
    y = x.copy()
    got.append((comm.all_reduce(y, async_op=True).wait() if comm.rank == 0 else comm.all_reduce(y)).tobytes())
    return got


@pytest.mark.timeout(60)
def test_ranks_on_different_paths_agree_bitwise_on_a_sum_of_nans_of_both_signs(local_cluster):
    """The compiler may order x + y's operands differently in two copies of a loop, and the CPU's add
    keeps its first operand's NaN: a float sum is one piece of code (reduce_sum.c) on every path."""
    first, second = local_cluster(2).run(nan_sums)
    assert first == second
    assert all(np.isnan(np.frombuffer(b, np.float32)).all() for b in first)


class Tagged(np.ndarray):
    """An ndarray subclass: the latency path takes exact ndarrays only, so a rank holding one runs
    the Python round."""


def gathers(comm):
    comm.barrier()
    results = []
    for shape, dtype in (((), np.int64), ((3,), np.float32), ((2, 3), np.int16), ((0,), np.float64)):
        x = np.full(shape, comm.rank + 1, dtype)
        results.append(comm.all_gather(x).tolist())
        mixed = x.view(Tagged) if comm.rank == 1 else x  # rank 1 on the Python round, the others on C
        results.append(comm.all_gather(mixed).tolist())
    return results, comm.engine.channels[comm.group.gid].small is not None


@pytest.mark.timeout(60)
def test_a_small_all_gather_stacks_every_members_array_on_either_path(local_cluster):
    want = []
    for shape, dtype in (((), np.int64), ((3,), np.float32), ((2, 3), np.int16), ((0,), np.float64)):
        stacked = np.concatenate([np.full(shape, rank + 1, dtype).reshape(shape or (1,)) for rank in range(3)])
        want += [stacked.tolist()] * 2
    for results, fast in local_cluster(3).run(gathers):
        assert fast and results == want


def scatters(comm):
    comm.barrier()
    results = []
    for dtype, op in ((np.float32, "sum"), (np.int32, "max"), (np.float64, "avg"), (np.uint8, "min")):
        x = (np.arange(12).reshape(6, 2) * (comm.rank + 1) % 7).astype(dtype)
        results.append(comm.reduce_scatter(x, op=op).tolist())
        mixed = x.view(Tagged) if comm.rank == 1 else x  # rank 1 on the Python round, the others on C
        results.append(comm.reduce_scatter(mixed, op=op).tolist())
    return results, comm.engine.channels[comm.group.gid].small is not None


@pytest.mark.timeout(60)
def test_a_small_reduce_scatter_gives_each_member_its_rows_on_either_path(local_cluster):
    per_rank = local_cluster(3).run(scatters)
    cases = ((np.float32, "sum"), (np.int32, "max"), (np.float64, "avg"), (np.uint8, "min"))
    for rank, (results, fast) in enumerate(per_rank):
        assert fast
        for index, (dtype, op) in enumerate(cases):
            inputs = [(np.arange(12).reshape(6, 2) * (r + 1) % 7).astype(dtype) for r in range(3)]
            want = in_rank_order(inputs, op).astype(dtype)[2 * rank : 2 * rank + 2].tolist()
            assert results[2 * index] == want and results[2 * index + 1] == want, (dtype, op, rank)


def small_mismatch(comm):
    comm.barrier()
    try:
        if comm.rank == 0:
            comm.all_reduce(np.ones(4, np.float32))
        else:
            comm.broadcast(np.ones(4, np.float32), 0)
    except CollectiveMismatch as exc:
        message = str(exc)
    comm.barrier()  # the channel is usable again after the mismatch
    return message, comm.all_reduce(np.ones(2, np.int32)).tolist()


@pytest.mark.timeout(60)
def test_a_small_mismatch_names_both_signatures_on_every_rank_and_the_channel_goes_on(local_cluster):
    for rank, (message, after) in enumerate(local_cluster(2).run(small_mismatch)):
        assert "op=all_reduce" in message and "op=broadcast" in message and f"rank {rank} called it" in message
        assert after == [2, 2]


def fail_during_waits(comm, count=8):
    """Rank 1 raises while the others wait in an all_reduce of `count` float32 (the small round; 40,000
    at 2 ranks: the reduce-scatter round, tests/test_runtime_shm_halves.py)."""
    comm.barrier()
    if comm.rank == 1:
        time.sleep(0.3)
        raise ValueError("bad input on purpose")
    comm.all_reduce(np.ones(count, np.float32), timeout=60)  # only an abort ends this in time


def small_sums(comm):
    return comm.all_reduce(np.ones(3, np.int64)).tolist()


@pytest.mark.timeout(60)
def test_ranks_sleeping_in_a_small_round_wake_when_a_peer_raises(local_cluster):
    cluster = local_cluster(3)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="bad input on purpose"):
        cluster.run(fail_during_waits, timeout=30)
    assert time.monotonic() - start < 20.0  # far below the collective's 60 s timeout
    assert cluster.run(small_sums) == [[3, 3, 3]] * 3


def traced_small(comm):
    comm.barrier()
    comm.tracer.start()
    try:
        comm.all_reduce(np.ones(4, np.float32))
        comm.barrier()
        comm.all_gather(np.ones(2, np.float64))
        events = [e for e in comm.tracer.events if e[2] == "comm"]
    finally:
        comm.tracer.enabled = False
    return [(name, args.get("bytes"), "wait_us" in args, args.get("seq")) for _, name, _, _, _, _, args in events]


@pytest.mark.timeout(60)
def test_a_small_collective_records_its_trace_span(local_cluster):
    for spans in local_cluster(2).run(traced_small):
        assert spans == [["all_reduce", 16, True, 1], ["barrier", 0, True, 2], ["all_gather", 32, True, 3]]


def sums_of_every_dtype(comm):
    comm.barrier()
    sums = [comm.all_reduce(rank_input(dtype, comm.rank)).tobytes() for dtype in DTYPES]
    return sums, comm.engine.channels[comm.group.gid].small is not None


@pytest.fixture(scope="module")
def python_rounds():
    """Two ranks whose small collectives keep to the Python rounds (RINGPIPE_SHM_SMALL=0)."""
    from ringpipe.runtime import Cluster

    with Cluster(2, env={"RINGPIPE_SHM_SMALL": "0"}) as cluster:
        yield cluster


@pytest.mark.timeout(90)
def test_the_python_rounds_give_the_same_bits_when_the_latency_path_is_off(local_cluster, python_rounds):
    with np.errstate(over="ignore", invalid="ignore"):
        fast = local_cluster(2).run(sums_of_every_dtype)
        python = python_rounds.run(sums_of_every_dtype)
    assert all(used for _, used in fast) and not any(used for _, used in python)
    assert [sums for sums, _ in fast] == [sums for sums, _ in python]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["c", "python"])
def test_a_small_round_times_out_naming_operation_group_rank_and_peer_on_either_path(local_cluster, python_rounds,
                                                                                      path):
    cluster = local_cluster(2) if path == "c" else python_rounds
    message = cluster.run(alone_after_open, timeout=30)[1]
    # The collective's number depends on the tests run before on the module's cluster.
    assert re.match(r"all_reduce #\d+ on group w \(rank 1 of 2\) on rank 1 timed out after 0.5s", message), message
    assert message.endswith("waiting for a message from rank 0"), message


@pytest.mark.timeout(60)
def test_the_python_rounds_name_both_signatures_on_a_small_mismatch(python_rounds):
    for rank, (message, after) in enumerate(python_rounds.run(small_mismatch)):
        assert "op=all_reduce" in message and "op=broadcast" in message and f"rank {rank} called it" in message
        assert after == [2, 2]


def test_a_wait_that_slept_but_ended_within_the_longest_spin_lengthens_the_spin_to_cover_it(monkeypatch):
    from ringpipe.runtime import shm_wait

    monkeypatch.setattr(shm_wait, "spare_core", lambda own_tasks: True)
    spin = shm_wait.Spin(yields=False)
    for _ in range(20):
        spin.answered(False)  # long waits (the peer computes): the spin shrinks to its least
    assert spin.ns() == shm_wait.MIN_SPIN_NS
    spin.answered(False, 30_000)  # a ping-pong turn of 30 µs: a 45 µs spin would have caught it
    assert spin.ns() == 45_000
    spin.answered(False, 10 * shm_wait.MAX_SPIN_NS)  # longer than any spin: shrink again
    assert spin.ns() == 22_500

"""The latency path's one-call round (runtime/csrc/shm_small_call.c): the arrays go in and out through
the buffer protocol, with the same bits as NumPy copies around the ctypes call, and the same
waits, errors and fallbacks."""
import gc
import sys
import threading
import time
import types
import weakref

import numpy as np
import pytest

from ringpipe.runtime import shm_small
from ringpipe.runtime.shm_wait import unavailable_reason
from tests.test_runtime_shm_small import DTYPES, Tagged, in_rank_order, rank_input

pytestmark = pytest.mark.skipif(unavailable_reason("c") is not None, reason=f"no C helper: {unavailable_reason('c')}")


def counting(small, calls, counted):
    """The extension with its `round` counted, and its `run` (csrc/shm_small_run.c, which calls the
    round from C) declining every case, so that each round goes through the counted `round`."""
    return types.SimpleNamespace(round=lambda *args: counted.append(1) or calls(*args), take=small.ext.take,
                                 halves=small.ext.halves, run=lambda *args: shm_small.NOT_HANDLED)


def odd_input(dtype, rank, shape):
    values = (np.arange(int(np.prod(shape))).reshape(shape) * (rank + 3)) % 11 - 4 * (rank % 2)
    return np.asarray(values).astype(dtype)


def every_collective(comm):
    """Every small collective, odd sizes, every dtype and op the path reduces: (bytes per case)."""
    results = []
    with np.errstate(over="ignore", invalid="ignore"):
        for dtype in DTYPES:
            for op in ("sum", "max", "min") + (("avg",) if dtype.startswith("float") else ()):
                results.append(comm.all_reduce(rank_input(dtype, comm.rank), op=op).tobytes())
                rows = odd_input(dtype, comm.rank, (comm.size, 5))  # 5 elements per member
                results.append(comm.reduce_scatter(rows, op=op).tobytes())
        for shape in ((), (1,), (7,), (3, 5)):
            results.append(comm.all_reduce(odd_input(np.float32, comm.rank, shape)).tobytes())
            results.append(comm.all_gather(odd_input(np.int16, comm.rank, shape)).tobytes())
            for root in range(comm.size):
                x = odd_input(np.uint8, comm.rank, shape)
                comm.broadcast(x, root)
                results.append(x.tobytes())
        comm.barrier()
    return results


def both_ways(comm):
    comm.barrier()  # opens the channel: what follows may take the latency path
    small = comm.engine.channels[comm.group.gid].small
    calls = small.ext.round
    counted = []
    small.ext = counting(small, calls, counted)
    try:
        through_extension = every_collective(comm)
    finally:
        extension, small.ext = small.ext, None
    try:
        with_numpy_copies = every_collective(comm)
    finally:
        small.ext = extension
    return through_extension, with_numpy_copies, len(counted)


def fresh_look(spin):
    """A look at the machine with a core spare that stays fresh for the test (a current one goes
    stale past shm_wait.SPARE_CHECK_NS, which a loaded machine can take between two lines: then the
    C call leaves the round to Python on one rank only); stale_look ends it."""
    spin._checked, spin._spare = time.monotonic_ns() + 10**12, True


def stale_look(spin):
    spin._checked = -1 << 62  # (the next wait looks at the machine again)


@pytest.mark.timeout(90)
def test_the_one_call_round_gives_the_bits_of_numpy_copies_for_every_collective_dtype_op_and_odd_size(
        local_cluster):
    per_rank = local_cluster(3).run(both_ways)
    for through_extension, with_numpy_copies, calls in per_rank:
        assert calls >= len(through_extension)  # every case went through the extension
        assert through_extension == with_numpy_copies
    assert per_rank[0][0][-1] == per_rank[1][0][-1] == per_rank[2][0][-1]


MID_CASES = (("float32", "sum"), ("float64", "avg"), ("int32", "max"), ("float32", "min"))
MID_COUNT = 20_001  # 78-156 KiB: above the small size, within the one-round reduce of 3 ranks (192 KiB)


def mid_input(dtype, rank):
    values = np.random.default_rng(rank).standard_normal(MID_COUNT) * 1e3
    return values.astype(dtype)


def mid_sums(comm):
    """Each mid-size case through the extension, with NumPy copies around the ctypes call, and
    with rank 1 on the Python round (an ndarray subclass): (bytes per case, extension calls)."""
    comm.barrier()
    small = comm.engine.channels[comm.group.gid].small
    calls, counted = small.ext.round, []
    results = []
    for dtype, op in MID_CASES:
        extension = counting(small, calls, counted)
        for way in ("extension", "numpy copies", "mixed"):
            x = mid_input(dtype, comm.rank)
            saved, small.ext = small.ext, (None if way == "numpy copies" else extension)
            try:
                comm.all_reduce(x.view(Tagged) if way == "mixed" and comm.rank == 1 else x, op=op)
            finally:
                small.ext = saved
            results.append(x.tobytes())
    return results, len(counted)


@pytest.mark.timeout(90)
def test_a_mid_size_all_reduce_takes_the_one_call_round_with_the_python_rounds_bits(local_cluster):
    per_rank = local_cluster(3).run(mid_sums)
    for rank, (results, calls) in enumerate(per_rank):
        assert calls == len(MID_CASES) * (2 if rank != 1 else 1)  # (rank 1's mixed case: the Python round)
        for index, (dtype, op) in enumerate(MID_CASES):
            want = in_rank_order([mid_input(dtype, r) for r in range(3)], op).astype(dtype).tobytes()
            assert results[3 * index : 3 * index + 3] == [want] * 3, (dtype, op, rank)


def mid_others(comm):
    """A mid-size broadcast, all_gather and reduce_scatter three ways, as mid_sums."""
    comm.barrier()
    small = comm.engine.channels[comm.group.gid].small
    calls, counted = small.ext.round, []
    extension = counting(small, calls, counted)
    results = []
    for way in ("extension", "numpy copies", "mixed"):
        saved, small.ext = small.ext, (None if way == "numpy copies" else extension)
        tag = (lambda x: x.view(Tagged)) if way == "mixed" and comm.rank == 1 else (lambda x: x)
        try:
            x = mid_input(np.float64, comm.rank).repeat(2)[:80_001]  # 625 KiB
            comm.broadcast(tag(x), 2)
            gathered = comm.all_gather(tag(mid_input(np.float32, comm.rank)))
            rows = comm.reduce_scatter(tag(mid_input(np.float32, comm.rank).repeat(3)[:90_003].reshape(3, -1)))
        finally:
            small.ext = saved
        results.append((x.tobytes(), np.asarray(gathered).tobytes(), np.asarray(rows).tobytes()))
    return results, len(counted)


@pytest.mark.timeout(90)
def test_a_mid_size_broadcast_all_gather_and_reduce_scatter_take_the_one_call_round_with_the_same_bits(
        local_cluster):
    per_rank = local_cluster(3).run(mid_others)
    inputs = [mid_input(np.float32, r).repeat(3)[:90_003].reshape(3, -1) for r in range(3)]
    for rank, (results, calls) in enumerate(per_rank):
        assert calls == (6 if rank != 1 else 3)  # (rank 1's mixed cases: the Python rounds)
        assert results[0] == results[1] == results[2], rank
        broadcast, gathered, rows = results[0]
        assert broadcast == mid_input(np.float64, 2).repeat(2)[:80_001].tobytes()
        assert gathered == np.concatenate([mid_input(np.float32, r) for r in range(3)]).tobytes()
        assert rows == in_rank_order(inputs, "sum")[rank].tobytes()


def late_peer(comm):
    comm.barrier()
    if comm.rank == 1:
        time.sleep(0.35)  # rank 0 waits in several slices, then takes the result after them
    total, gathered = comm.all_reduce(np.full(7, comm.rank + 1.0)), comm.all_gather(np.array([comm.rank], np.int32))
    return total.tolist(), gathered.tolist()


@pytest.mark.timeout(60)
def test_a_result_that_came_after_sleeps_is_copied_out_all_the_same(local_cluster):
    for total, gathered in local_cluster(2).run(late_peer):
        assert total == [3.0] * 7 and gathered == [0, 1]


def strided_sums(comm):
    comm.barrier()
    small = comm.engine.channels[comm.group.gid].small
    calls, counted = small.ext.round, []
    small.ext = types.SimpleNamespace(round=lambda *args: counted.append(calls(*args)) or counted[-1],
                                      take=small.ext.take, run=lambda *args: shm_small.NOT_HANDLED)
    try:
        strided = comm.all_reduce((np.arange(10.0) * (comm.rank + 1))[::2])  # not C-contiguous
        after = comm.all_reduce(np.full(3, comm.rank + 1.0))
    finally:
        small.ext = calls.__self__
    return strided.tolist(), after.tolist(), counted


@pytest.mark.timeout(60)
def test_arrays_the_extension_does_not_take_run_the_same_round_with_numpy_copies(local_cluster):
    for strided, after, answers in local_cluster(2).run(strided_sums):
        assert strided == (np.arange(10.0)[::2] * 3).tolist() and after == [3.0] * 3
        assert answers == [-1, 0]  # NOT_TAKEN (then NumPy copies around the ctypes call), then DONE


def dies_in_a_small_round(comm):
    comm.barrier()
    if comm.rank == 1:
        time.sleep(0.3)
        import os
        os._exit(3)
    comm.all_reduce(np.ones(5), timeout=60)  # only the death of rank 1 can end this in time
    return comm.rank


@pytest.mark.timeout(60)
def test_a_rank_waiting_in_a_small_round_learns_at_once_that_its_peer_died():
    from ringpipe.runtime import Cluster, WorkerDied

    with Cluster(2) as cluster:
        start = time.monotonic()
        with pytest.raises(WorkerDied) as raised:
            cluster.run(dies_in_a_small_round, timeout=30)
        assert time.monotonic() - start < 20.0
    assert "rank 1" in str(raised.value).splitlines()[0]


def test_the_extension_is_off_when_asked_so_and_built_otherwise(monkeypatch):
    from ringpipe.runtime import shm_small

    monkeypatch.setenv("RINGPIPE_SHM_SMALL_EXT", "0")
    assert shm_small.extension() is None
    monkeypatch.setenv("RINGPIPE_SHM_SMALL_EXT", "1")
    assert hasattr(shm_small.extension(), "round")  # (where the C helper builds, so do Python's headers here)


def bookkeeping_either_way(comm):
    """The same collectives with the bookkeeping in C (csrc/shm_small_run.c) and in Python (its `run`
    declining): per way, what each left behind (rounds, publishes, bytes sent, the group's next
    number), their results and what `run` answered."""
    comm.barrier()
    channel = comm.engine.channels[comm.group.gid]
    small, numbers = channel.small, comm._sequence
    real, answers = small.ext, []
    recording = types.SimpleNamespace(round=real.round, take=real.take, halves=real.halves,
                                      run=lambda *args: answers.append(real.run(*args)) or answers[-1])
    declining = types.SimpleNamespace(round=real.round, take=real.take, halves=real.halves,
                                      run=lambda *args: shm_small.NOT_HANDLED)
    out = {}
    for way, ext in (("c", recording), ("python", declining)):
        before = (channel.rounds, channel.count, comm.bytes_sent, repr(numbers._numbers[1]))
        # A stale look at the machine goes to Python (Spin.ns looks again): a fresh one, a core spare.
        fresh_look(channel.spin)
        small.ext = ext
        try:
            results = [comm.all_reduce(np.full(256, comm.rank + 1.0, np.float32)).tolist(),
                       comm.all_reduce(np.full(50000, comm.rank + 1.0)).sum(),  # the reduce-scatter round
                       comm.broadcast(np.full(8, comm.rank + 1, np.int32), 1).tolist(),
                       comm.all_gather(np.full(3, comm.rank, np.int16)).tolist()]
            comm.barrier()
        finally:
            small.ext = real
            stale_look(channel.spin)
        after = (channel.rounds, channel.count, comm.bytes_sent, repr(numbers._numbers[1]))
        out[way] = (results, [a - b for a, b in zip(after[:3], before[:3])], before[3], after[3])
    return out, answers


@pytest.mark.timeout(60)
def test_the_bookkeeping_in_c_leaves_what_the_python_bookkeeping_leaves(local_cluster):
    for out, answers in local_cluster(2).run(bookkeeping_either_way):
        assert out["c"][0] == out["python"][0]
        assert out["c"][1] == out["python"][1]  # rounds, publishes and bytes sent, alike
        assert out["c"][3] == out["python"][2]  # the group's numbers go on from where C left them
        assert answers and shm_small.NOT_HANDLED not in answers  # C took every one of them


def test_run_answers_a_signature_that_is_not_its_triple_with_a_type_error():
    # (an error set on every NULL return: else CPython raises SystemError about the extension)
    with pytest.raises(TypeError, match="signature"):
        shm_small.extension().run(None, None, "all_reduce", (1, 2), 1, 0, 0, None, None, -1, 0, None, 0, None, 0)


def run_paths(comm):
    """csrc/shm_small_run.c's `run` called directly on each of its ends: what each left behind (the
    channel's rounds and publishes, the group's next number, the lock, the fence, the bytes sent)
    and the reference counts of the objects it touches, over many calls."""
    comm.barrier()
    channel, engine, numbers = comm.engine.channels[comm.group.gid], comm.engine, comm._sequence
    small = channel.small
    x = np.ones(64, np.float32)
    signature = small._signature(("all_reduce", x.shape, x.dtype, "sum"),
                                 {"op": "all_reduce", "shape": [64], "dtype": "<f4", "reduce": "sum"})

    def run(timeout=None, fresh=True):
        if fresh:  # (a stale look at the machine is Python's, by design)
            fresh_look(channel.spin)
        return small.ext.run(small, comm, "all_reduce", signature, shm_small.KIND_REDUCE, 0, 0, x, x,
                             shm_small.FROM_SCRATCH, x.nbytes, timeout, x.nbytes, None, 0)

    def state():
        return (channel.rounds, channel.count, repr(numbers._numbers[1]), channel.lock.locked(), engine.needs_fence,
                comm.bytes_sent)

    def declined():
        answers = []
        engine.tracer.enabled = True  # tracing: Python takes the span
        answers.append(run())
        engine.tracer.enabled = False
        stale_look(channel.spin)  # a stale look at the machine: Spin.ns looks again
        answers.append(run(fresh=False))
        engine.aborted_call = "an abort"
        answers.append(run())
        engine.aborted_call = None
        channel.epoch, epoch = -1, channel.epoch  # (the first round of an epoch resets the channel's counts)
        answers.append(run())
        channel.epoch = epoch
        return answers

    def busy():
        with channel.lock:
            return run()

    def fails_before_its_number():
        try:
            run(timeout="soon")
        except TypeError:
            return "TypeError"

    def fails_after_its_number():
        channel._written[:] = [None, None]
        channel.write_signature_bytes = lambda *args: 1 / 0
        try:
            run()
        except ZeroDivisionError:
            return "ZeroDivisionError"
        finally:
            del channel.write_signature_bytes

    def unpublished():
        # A failure after its number ends a real call, and the driver fences before the next one; this
        # one goes on, so it takes the round that was counted but never published back (else the next
        # round would reuse the buffers of the last one while a slower peer may still read them).
        channel.rounds -= 1
        channel.count -= 1

    out = {}
    for name, end in (("declined", declined), ("busy", busy), ("before", fails_before_its_number),
                      ("after", fails_after_its_number), ("done", run)):
        engine.needs_fence = False
        before = state()
        out[name] = (end(), before, state())
        if name == "after":
            unpublished()
    engine.needs_fence = False
    watched = (channel, engine, channel.lock, channel.spin, channel._written, engine.tracer, engine.send_lock,
               engine.bytes_sent, small.fixed, signature, x, comm, small, numbers)
    gc.collect()  # (garbage of earlier calls, collected during the loop, would hold some of them)
    counts = [sys.getrefcount(o) for o in watched]
    for _ in range(300):
        for end in (declined, busy, fails_before_its_number, fails_after_its_number):
            end()
        unpublished()
        run()
    engine.needs_fence = False
    gc.collect()
    stale_look(channel.spin)
    after = [sys.getrefcount(o) for o in watched]  # (zip's reused tuple would hold one more of each)
    return out, [now - count for now, count in zip(after, counts)]


@pytest.mark.timeout(60)
def test_each_end_of_the_c_bookkeeping_leaves_what_python_would_and_holds_no_reference(local_cluster):
    for out, references_alike in local_cluster(2).run(run_paths):
        answers, before, after = out["declined"]
        assert answers == [shm_small.NOT_HANDLED] * 4 and after == before  # nothing taken, lock free
        assert out["busy"][0] == shm_small.NOT_RUN and out["busy"][2] == out["busy"][1]
        assert out["before"][0] == "TypeError" and out["before"][2] == out["before"][1]  # no number, no fence
        raised, before, after = out["after"]
        assert raised == "ZeroDivisionError" and list(after[3:]) == [False, True, before[5]]  # lock free, fence
        assert list(after[:2]) == [before[0] + 1, before[1] + 1] and after[2] != before[2]  # numbered, counted
        answer, before, after = out["done"]
        assert answer == shm_small.FILLED and list(after[:2]) == [before[0] + 1, before[1] + 1]
        assert list(after[3:]) == [False, False, before[5] + 64 * 4]
        # (a reference held or dropped per call would be 300 or more; the worker's other threads hold
        # the engine and its objects for moments, one or two)
        assert all(abs(change) <= 2 for change in references_alike), references_alike


class Totals(dict):
    """A byte count that a weak reference can watch."""


def fixed_replaced_in_a_call(comm):
    """SmallRounds.fixed replaced (and the old tuple dropped) while `run` is in Python code it calls:
    whether what it read from the old tuple was still alive there."""
    comm.barrier()
    channel = comm.engine.channels[comm.group.gid]
    small, real = channel.small, channel.small.fixed
    small.fixed = real[:7] + (threading.Lock(), Totals()) + real[9:]
    watched, alive = weakref.ref(small.fixed[8]), []

    def replaced(*args):
        small.fixed = real
        gc.collect()
        alive.append(watched() is not None)
        raise ZeroDivisionError  # (on every member: no round runs)

    channel._written[:] = [None, None]
    channel.write_signature_bytes = replaced
    fresh_look(channel.spin)
    try:
        small.ext.run(small, comm, "barrier", small._signature("barrier", {"op": "barrier"}), shm_small.KIND_BARRIER,
                      0, 0, None, None, 0, 0, None, 0, None, 0)
    except ZeroDivisionError:
        pass
    finally:
        del channel.write_signature_bytes
        comm.engine.needs_fence = False
        stale_look(channel.spin)
    return alive


@pytest.mark.timeout(60)
def test_run_holds_what_it_read_of_the_channel_for_the_whole_call(local_cluster):
    assert local_cluster(2).run(fixed_replaced_in_a_call) == [[True], [True]]

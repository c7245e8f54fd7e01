"""Same-host group channels (runtime/shm_channel.py, shm_collectives.py, shm_wait.py): collectives a
caller waits for move through shared memory from the calling thread, with the engine's results,
errors, timeouts and aborts."""
import mmap
import os
import threading
import re
import time

import numpy as np
import pytest

from ringpipe.runtime import RemoteError
from ringpipe.runtime.operations import CollectiveMismatch
from ringpipe.runtime.shm import Arena, same_host
from ringpipe.runtime.shm_wait import MODES, unavailable_reason, waiter

SMALL_ARENA = 1 << 20  # channel buffers of 64 KiB: the larger cases below go in several rounds
DTYPES = ["int8", "uint8", "int16", "int32", "int64", "uint64", "float16", "float32", "float64", "complex64",
          "bool"]


# ---- waiting ------------------------------------------------------------------------------------
def counter():
    """A 64-bit counter and a sleeper count in a shared mapping (what a futex needs)."""
    mapping = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    words = np.frombuffer(mapping, np.uint64)
    return mapping, words, int(words.ctypes.data), int(words.ctypes.data) + 8


@pytest.fixture(params=MODES)
def wait_mode(request):
    reason = unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


def test_a_waiter_wakes_when_the_counter_is_published(wait_mode):
    mapping, words, word, sleepers = counter()
    way = waiter(wait_mode)
    publisher = threading.Timer(0.05, lambda: way.publish(word, sleepers, 3))
    publisher.start()
    assert way.wait_at_least(word, sleepers, 3, 30.0, 1000, False) == 3
    publisher.join()
    del words
    mapping.close()


def test_a_wait_ends_at_its_timeout_when_nobody_publishes(wait_mode):
    mapping, words, word, sleepers = counter()
    start = time.monotonic()
    assert waiter(wait_mode).wait_at_least(word, sleepers, 1, 0.2, 1000, True) == 0
    assert 0.19 <= time.monotonic() - start < 10.0
    del words
    mapping.close()


def test_a_sleeping_waiter_wakes_on_a_wake_without_a_change(wait_mode):
    if wait_mode == "poll":
        pytest.skip("poll sleeps at most 1 ms and needs no wake")
    mapping, words, word, sleepers = counter()
    way = waiter(wait_mode)
    threading.Timer(0.1, lambda: way.wake(word)).start()
    start = time.monotonic()
    assert way.wait_at_least(word, sleepers, 1, 20.0, 0, False) == 0
    assert time.monotonic() - start < 10.0  # woke well before its 20 s timeout
    del words
    mapping.close()


def test_a_core_is_spare_while_the_runnable_tasks_fit_on_this_process_cores_or_are_the_jobs_own(tmp_path):
    from ringpipe.runtime.shm_wait import cores, spare_core

    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {cores()}/300 4242\n")
    assert spare_core(1, str(loadavg))
    loadavg.write_text(f"9.50 9.40 9.30 {cores() + 1}/300 4242\n")
    assert not spare_core(1, str(loadavg))
    assert spare_core(cores() + 1, str(loadavg))  # all of them may be this job's own ranks, handing over cores
    assert spare_core(1, str(tmp_path / "missing"))  # no such count (not Linux): spin as before


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="no /proc/loadavg here (not Linux)")
def test_a_look_at_the_kernels_count_of_runnable_tasks_keeps_one_descriptor_open():
    from ringpipe.runtime import shm_wait
    from ringpipe.runtime.shm_wait import spare_core

    spare_core(1)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(100):
        spare_core(1)
    assert len(os.listdir("/proc/self/fd")) == before  # one pread a look: no open, no close
    os.close(shm_wait._open_files["/proc/loadavg"])  # closed by someone else: one look misses, then it reopens
    spare_core(1)
    spare_core(1)
    fd = shm_wait._open_files["/proc/loadavg"]
    assert os.readlink(f"/proc/self/fd/{fd}") == "/proc/loadavg"
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_waiter_does_not_spin_while_no_core_is_spare_and_adapts_its_spin_otherwise(monkeypatch):
    from ringpipe.runtime import shm_wait

    spin = shm_wait.Spin(yields=False)
    monkeypatch.setattr(shm_wait, "spare_core", lambda own_tasks: False)
    assert spin.ns() == 0
    monkeypatch.setattr(shm_wait, "spare_core", lambda own_tasks: True)
    spin._checked -= shm_wait.SPARE_CHECK_NS  # as if the last look were that long ago
    first = spin.ns()
    spin.answered(False)
    assert 0 < spin.ns() < first  # a wait that had to sleep: spin less
    for _ in range(20):
        spin.answered(True)
    assert spin.ns() == shm_wait.MAX_SPIN_NS


# ---- placement and arena ------------------------------------------------------------------------
def test_a_peer_is_on_this_host_when_its_host_record_matches_or_is_missing():
    assert same_host({"host": "a/1"}, "a/1")
    assert not same_host({"host": "b/1"}, "a/1")
    assert same_host({"rank": 3}, "a/1")


def test_a_pinned_arena_block_survives_reset(tmp_path):
    arena = Arena(str(tmp_path / "arena"), 1 << 16)
    try:
        pinned = arena.pin(4096)
        arena.alloc(100)
        arena.reset()
        assert not arena.free(pinned)
        assert all(arena.alloc(4096) != pinned for _ in range(15))
    finally:
        arena.close()


# ---- collectives over the channel ---------------------------------------------------------------------
def reference(kind, inputs, root=1):
    total = inputs[0].astype(np.float32 if inputs[0].dtype == np.float16 else inputs[0].dtype)
    for x in inputs[1:]:
        total = total + x if total.dtype != bool else total | x
    if kind == "all_reduce":
        return [total.astype(inputs[0].dtype)] * len(inputs)
    if kind == "reduce_scatter":
        return list(np.split(total.astype(inputs[0].dtype), len(inputs)))
    if kind == "all_gather":
        return [np.concatenate([x.reshape(-1, *x.shape[1:]) if x.ndim else x.reshape(1) for x in inputs])] * len(inputs)
    return [inputs[root]] * len(inputs)


def check(results_per_rank, cases):
    n = len(results_per_rank)
    for index, (kind, dtype, count, layout) in enumerate(cases):
        inputs = [results_per_rank[r][0][index][0] for r in range(n)]
        expected = reference(kind, inputs, root=n - 1)
        for rank in range(n):
            got = results_per_rank[rank][0][index][1]
            want = expected[rank]
            assert got.dtype == want.dtype and got.shape == want.shape, (kind, dtype, count, layout, rank)
            assert np.array_equal(got, want), (kind, dtype, count, layout, rank)
    assert all(r[1] for r in results_per_rank), "the channel was not used"


KINDS = ["all_reduce", "reduce_scatter", "all_gather", "broadcast"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_collective_and_dtype_on_the_channel_matches_numpy(local_cluster, dtype):
    """3 ranks (uneven splits), sizes from empty to several channel buffers, strided inputs."""
    cluster = local_cluster(3, arena_bytes=SMALL_ARENA)
    counts = [0, 1, 5, 40_000] if dtype in ("float32", "int64") else [0, 3, 9_000]
    cases = [(kind, dtype, count, layout) for kind in KINDS for count in counts for layout in ("contiguous", "strided")]
    results = cluster.run(original_and_result, cases)
    check(results, cases)


def original_and_result(comm, cases):
    """Like run_cases, but keeps each input as it was before the (in-place) collective."""
    comm.barrier()
    out = []
    for kind, dtype, count, layout in cases:
        rng = np.random.default_rng(comm.rank + 1)
        base = (rng.integers(0, 5, size=(2 * comm.size * count,)) + comm.rank).astype(dtype)
        x = base[::2] if layout == "strided" else base[: comm.size * count].copy()
        before = np.array(x, copy=True)
        if kind == "all_reduce":
            result = comm.all_reduce(x)
        elif kind == "reduce_scatter":
            result = comm.reduce_scatter(x)
        elif kind == "all_gather":
            result = comm.all_gather(x)
        else:
            result = comm.broadcast(x, src=comm.size - 1)
        out.append((before, np.array(result, copy=True)))
    return out, comm.engine.channels.get(comm.group.gid) is not None


def sums_with_mode(comm):
    comm.barrier()
    small, large = np.full(10, comm.rank + 1.0), np.full(100_000, comm.rank + 1.0, np.float32)
    comm.all_reduce(small)
    comm.all_reduce(large, op="avg")
    sub = comm.new_group([0, 2])
    parts = sub.all_gather(np.array([comm.rank])).tolist() if sub is not None else None
    channel = comm.engine.channels[comm.group.gid]
    return small.tolist(), float(large[0]), float(large[-1]), parts, channel.waiter.mode


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["syscall", "poll"])
def test_the_fallback_waits_give_the_same_results(local_cluster, mode):
    if unavailable_reason(mode):
        pytest.skip(unavailable_reason(mode))
    from ringpipe.runtime import Cluster

    with Cluster(3, arena_bytes=SMALL_ARENA, env={"RINGPIPE_SHM_WAIT": mode}) as cluster:
        for rank, (small, first, last, parts, used) in enumerate(cluster.run(sums_with_mode)):
            assert small == [6.0] * 10 and first == last == 2.0 and used == mode
            assert parts == ([0, 2] if rank != 1 else None)


def mismatched_after_open(comm):
    comm.barrier()
    try:
        if comm.rank == 0:
            comm.all_reduce(np.ones(4))
        else:
            comm.all_gather(np.ones(4))
    except CollectiveMismatch as exc:
        return str(exc)
    return None


@pytest.mark.timeout(60)
def test_a_mismatch_on_the_channel_names_both_signatures_on_every_rank(local_cluster):
    messages = local_cluster(2).run(mismatched_after_open)
    for rank, message in enumerate(messages):
        assert message is not None and "op=all_reduce" in message and "op=all_gather" in message, message
        assert f"rank {rank} called it" in message


def alone_after_open(comm):
    comm.barrier()
    if comm.rank == 1:
        try:
            comm.all_reduce(np.ones(3), timeout=0.5)
        except TimeoutError as exc:
            return str(exc)
    return None


@pytest.mark.timeout(60)
def test_a_channel_wait_times_out_naming_operation_group_rank_and_peer(local_cluster):
    message = local_cluster(2).run(alone_after_open, timeout=30)[1]
    assert "all_reduce" in message and "group w" in message and "rank 1" in message
    assert "waiting for a message from rank 0" in message


def fail_while_peers_wait(comm, how):
    comm.barrier()
    if comm.rank == 1:
        time.sleep(0.3)
        if how == "raise":
            raise ValueError("bad input on purpose")
        import os
        os._exit(3)
    comm.all_reduce(np.ones(100_000), timeout=60)  # only an abort can end this in time
    return comm.rank


@pytest.mark.timeout(60)
def test_ranks_waiting_on_the_channel_wake_when_a_peer_raises(local_cluster):
    cluster = local_cluster(3)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="bad input on purpose"):
        cluster.run(fail_while_peers_wait, "raise", timeout=30)
    assert time.monotonic() - start < 20.0  # far below the collective's 60 s timeout
    assert cluster.run(sums_after_abort) == [[3.0] * 5] * 3


def sums_after_abort(comm):
    x = np.ones(5)
    comm.all_reduce(x)
    return x.tolist()


@pytest.mark.timeout(60)
def test_ranks_waiting_on_the_channel_wake_when_a_peer_dies():
    from ringpipe.runtime import Cluster, WorkerDied

    with Cluster(3) as cluster:
        start = time.monotonic()
        with pytest.raises(WorkerDied):
            cluster.run(fail_while_peers_wait, "exit", timeout=30)
        assert time.monotonic() - start < 20.0


# ---- point-to-point over the pair rings ------------------------------------------------------------
RING_ARENA = 8 << 20  # rings of 16 KiB slots; messages above 2 MiB go in parts


def p2p_messages(comm, cases):
    """Rank 0 sends every case (strided ones too), then 100 small messages at once (more than a ring
    holds: the sender waits for the receiver); rank 1 receives them, some into `out`."""
    if comm.rank == 0:
        for index, (dtype, count) in enumerate(cases):
            base = (np.arange(2 * count) % 11).astype(dtype)
            comm.send(base[::2], 1, tag=index)
        for i in range(100):
            comm.send(np.array([i]), 1, tag=1000)
        return comm.engine.rings is not None
    if comm.rank == 1:
        got = []
        for index, (dtype, count) in enumerate(cases):
            if index % 2:
                out = np.empty(count, dtype)
                assert comm.recv(0, tag=index, out=out) is out
                got.append(out)
            else:
                got.append(comm.recv(0, tag=index))
        return got, [int(comm.recv(0, tag=1000)[0]) for _ in range(100)]
    return None


@pytest.mark.timeout(90)
def test_point_to_point_over_the_rings_delivers_every_dtype_size_and_layout_in_order(local_cluster):
    cases = [(dtype, count) for dtype in DTYPES for count in (0, 3)] + [
        ("float32", 4_000), ("float64", 2_100), ("uint8", 700_000), ("float64", 700_000)]  # a slot, 1, 3 parts
    ok, (got, ordered), _ = local_cluster(3, arena_bytes=RING_ARENA).run(p2p_messages, cases, timeout=60)
    assert ok and ordered == list(range(100))
    for (dtype, count), values in zip(cases, got):
        expected = (np.arange(2 * count) % 11).astype(dtype)[::2]
        assert values.dtype == expected.dtype and np.array_equal(values, expected), (dtype, count)


def traced_both_ways(comm):
    comm.barrier()  # opens the channel
    comm.all_reduce(np.ones(100))  # over the channel
    comm.all_reduce(np.ones(100), async_op=True).wait()  # over the engine


@pytest.mark.timeout(60)
def test_a_channel_collective_is_traced_with_the_engines_span_and_arguments(local_cluster, tmp_path):
    import json

    cluster = local_cluster(2)
    cluster.start_trace()
    cluster.run(traced_both_ways)
    paths = cluster.stop_trace(str(tmp_path))
    events = json.load(open(sorted(paths)[0]))["events"]
    channel, engine = [e[6] for e in events if e[0] == "X" and e[1] == "all_reduce"][-2:]
    assert set(channel) == set(engine) and channel["bytes"] == engine["bytes"] == 800
    assert channel["seq"] + 1 == engine["seq"] and channel["wait_us"] >= 0


# ---- asynchronous collectives on the channel's thread ------------------------------------------------
def async_in_order(comm):
    comm.barrier()  # opens the channel: asynchronous collectives use it from then on
    arrays = [np.full(size, comm.rank + 1.0) for size in (10, 100_000, 3, 300_000)]
    handles = [comm.all_reduce(x, async_op=True) for x in arrays]
    gathered = comm.all_gather(np.array([comm.rank]), async_op=True)
    blocking = comm.all_reduce(np.ones(4))  # queues behind them
    results = [h.wait() for h in reversed(handles)]
    stream = comm.engine.channels[comm.group.gid]._thread is not None
    return [float(r[0]) for r in results] + [float(r[-1]) for r in results], gathered.wait().tolist(), \
        blocking.tolist(), stream


@pytest.mark.timeout(60)
def test_asynchronous_collectives_run_in_order_on_the_channel_thread(local_cluster):
    for values, gathered, blocking, stream in local_cluster(2).run(async_in_order):
        assert values == [3.0] * 8 and gathered == [0, 1] and blocking == [2.0] * 4 and stream


class LeavesAsync:
    def __init__(self, comm):
        self.comm, self.handle = comm, None

    def leave(self):
        self.comm.barrier()
        if self.comm.rank == 0:
            self.handle = self.comm.all_reduce(np.ones(4), async_op=True)  # rank 1 never joins it

    def sum_and_left_handle(self):
        x = np.full(4, self.comm.rank + 1.0)
        self.comm.all_reduce(x)
        left = None
        if self.handle is not None:
            try:
                self.handle.wait(timeout=10)
            except Exception as exc:  # noqa: BLE001 - the test looks at what it was
                left = f"{type(exc).__name__}: {exc}"
        return x.tolist(), left


@pytest.mark.timeout(60)
def test_an_asynchronous_channel_collective_left_running_is_cancelled_and_the_next_call_works(local_cluster):
    actors = local_cluster(2).spawn(LeavesAsync)
    actors.leave().result(timeout=30)
    (first, left), (second, nothing) = actors.sum_and_left_handle().result(timeout=30)
    assert first == second == [3.0] * 4 and nothing is None
    # The collective's number depends on whether an earlier test of this module opened the channel.
    assert re.match(r"Cancelled: all_reduce #\d+ on group w", left) and "wait()" in left


def marked_running_as_it_leaves_the_queue(comm):
    """Asynchronous all_reduces on the channel's thread, with its queue watched: whether each was
    marked running when it left the queue (busy() reads the queue, then the mark)."""
    from collections import deque

    comm.barrier()  # the channel is open
    channel = comm.engine.channels[comm.group.gid]
    seen = []

    class Watched(deque):
        def popleft(self):
            seen.append(channel._running is not None)
            return super().popleft()

    channel._queue = Watched(channel._queue)
    for _ in range(3):
        comm.all_reduce(np.ones(4), async_op=True).wait()
    return seen


@pytest.mark.timeout(60)
def test_an_asynchronous_operation_is_marked_running_before_it_leaves_the_queue(local_cluster):
    """Otherwise a waited-for collective on the calling thread could find the channel idle in
    between and run before the asynchronous one queued ahead of it (peers would mismatch)."""
    assert local_cluster(2).run(marked_running_as_it_leaves_the_queue) == [[True] * 3] * 2


def test_a_handle_waits_times_out_and_hands_its_result_or_error_to_every_waiter():
    from ringpipe.runtime.operations import CommTimeout, Handle

    handle = Handle("op #0", transform=lambda result: result * 2)
    assert not handle.is_done()
    with pytest.raises(CommTimeout, match="op #0: not finished after waiting 0.01s"):
        handle.wait(0.01)
    got = []
    waiters = [threading.Thread(target=lambda: got.append(handle.wait(10))) for _ in range(3)]
    for thread in waiters:
        thread.start()
    handle._set(21)
    for thread in waiters:
        thread.join(10)
    assert got == [42, 42, 42] and handle.is_done() and handle.wait(0) == 42
    failed = Handle("op #1")
    failed._set(error=ValueError("bad"))
    failed._set(error=KeyError("later"))  # set twice (an abort racing the end): the last one stands
    with pytest.raises(KeyError):
        failed.wait()

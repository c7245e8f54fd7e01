"""The latency path's reduce-scatter + all-gather round (runtime/shm_small.py's KIND_HALVES: csrc/shm_small.c
runs the chunk loop of csrc/shm_reduce_chunks.c on one chunk) and the streaming stores into the channel
buffers (runtime/stream_store.py, csrc/stream_store.h): NumPy's rank-order bits on every path, members
on different paths meet in the same round, errors name the operation, rank and peer."""
import os
import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ringpipe.runtime import RemoteError, reduce_kernels, shm_channel, shm_collectives, shm_small, shm_wait, stream_store
from ringpipe.runtime.operations import CollectiveMismatch
from ringpipe.runtime.shm_wait import unavailable_reason
from tests.test_runtime_env_setting import check_setting
from tests.test_runtime_shm_small import fail_during_waits

needs_c = pytest.mark.skipif(reduce_kernels.unavailable_reason() is not None or unavailable_reason("c") is not None,
                             reason="no C helper here")
# The round is taken while every member has a core of its own: a 2-rank group on a host with 2 cores.
needs_cores = pytest.mark.skipif(shm_collectives.HOST_CORES < 2, reason="one core: 2 ranks take the one-round reduce")
# Above the one-round reduce (64 KiB), in one chunk (1 MiB) or several (the last: 3 chunks); odd counts
# leave a vector loop's tail.
CASES = [("float32", (1 << 15) + 3, "sum"), ("float64", 20001, "avg"), ("float32", 70001, "max"),
         ("int32", (1 << 16) + 1, "sum"), ("uint8", 200003, "min"), ("float64", 300001, "sum")]


def chunks(dtype, count):
    per_chunk = shm_collectives.CHUNK_BYTES // np.dtype(dtype).itemsize
    return -(-count // per_chunk)


def rank_input(dtype, count, rank, case):
    rng = np.random.default_rng(100 * case + rank)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True)  # integer sums wrap
    x = (rng.standard_normal(count) * 10.0 ** rng.integers(-3, 4, count)).astype(dtype)
    x[:: 97] = -0.0  # signed zeros: which one a sum keeps shows the order
    return x


def in_rank_order(inputs, op):
    reduce = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum}[op]
    with np.errstate(over="ignore"):
        total = reduce(inputs[0], inputs[1])
        return total / 2 if op == "avg" else total


# ---- streaming stores ---------------------------------------------------------------------------------
def test_a_streamed_copy_equals_numpys_at_every_alignment_and_length():
    source = np.random.default_rng(0).integers(0, 255, 70000, dtype=np.uint8)
    for length in (0, 1, 15, 16, 17, 63, 64, 65, 200, 4103, 65599):
        for shift in (0, 1, 8, 15, 16, 17):
            target = np.zeros(length + 64, np.uint8)
            stream_store.copy(target[shift : shift + length], source[3 : 3 + length], 1)
            assert (target[shift : shift + length] == source[3 : 3 + length]).all(), (length, shift)
            assert not target[:shift].any() and not target[shift + length :].any(), (length, shift)


@needs_c
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_sum_streamed_to_its_output_keeps_the_bits_and_may_write_over_its_first_two_inputs(dtype):
    rng = np.random.default_rng(1)
    kernel = reduce_kernels.c_sum(np.dtype(dtype))
    for count in (2, 3, 4):
        for divisor in (0, count):
            for into in (None, 0, 1):
                inputs = [rng.standard_normal(5003).astype(dtype) for _ in range(count)]
                want = inputs[0] + inputs[1]
                for x in inputs[2:]:
                    want = want + x
                want = want / divisor if divisor else want
                out = np.empty(5003, dtype) if into is None else inputs[into]
                copy = np.empty(5003, dtype)
                kernel([a.ctypes.data for a in inputs], 5003, divisor, out.ctypes.data, copy.ctypes.data, True)
                assert out.tobytes() == want.tobytes() and copy.tobytes() == want.tobytes(), (count, divisor, into)


def test_the_stream_threshold_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    check_setting(monkeypatch, "RINGPIPE_SHM_STREAM_MIN", lambda: stream_store.stream_min_bytes(2),
                  stream_store._min_bytes.cache_clear, [("off", 0), ("0", 0), ("12345", 12345)], ["lots", "-4"])
    cores = len(os.sched_getaffinity(0))
    assert stream_store.stream_min_bytes(cores) == stream_store.DEFAULT_MIN_BYTES
    assert stream_store.stream_min_bytes(cores + 1) == 0  # a peer may run on this core next


def test_an_all_reduce_above_the_reduce_limit_streams_nothing_and_the_limit_comes_from_the_environment(monkeypatch):
    cores = len(os.sched_getaffinity(0))

    def read():  # the limit, and what a reduction of 64 KiB and of one byte more streams from
        return (stream_store.reduce_max_bytes(), stream_store.stream_min_bytes(cores, 65536),
                stream_store.stream_min_bytes(cores, 65537), stream_store.stream_min_bytes(cores))

    least = stream_store.DEFAULT_MIN_BYTES
    check_setting(monkeypatch, "RINGPIPE_SHM_STREAM_REDUCE_MAX", read, stream_store.reduce_max_bytes.cache_clear,
                  [("off", (1 << 62, least, least, least)), ("0", (0, 0, 0, least)),
                   ("65536", (65536, least, 0, least))], ["big", "-1"])
    private = stream_store.private_cache_bytes(min(os.sched_getaffinity(0)))
    assert stream_store.reduce_max_bytes() == (private // 4 if private else stream_store.FALLBACK_REDUCE_MAX_BYTES)


def test_a_byte_count_beyond_64_bits_means_no_limit_and_fits_the_control_words(monkeypatch):
    """The C helpers take the thresholds as 64-bit words (SmallRounds.ctl, the chunk loop's state): a
    byte count past that range is "more than any buffer", not an OverflowError at the channel's opening
    that names no variable."""
    huge = str(10**20)
    monkeypatch.setenv("RINGPIPE_SHM_STREAM_REDUCE_MAX", huge)
    monkeypatch.setenv("RINGPIPE_SHM_STREAM_MIN", huge)
    stream_store.reduce_max_bytes.cache_clear(), stream_store._min_bytes.cache_clear()
    try:
        words = np.zeros(3, np.int64)
        words[:] = [stream_store.reduce_max_bytes(), stream_store.stream_min_bytes(2),
                    stream_store.stream_min_bytes(2, 1 << 40)]
        assert words[0] >= 1 << 62 and words[1] >= 1 << 62 and words[2] >= 1 << 62
    finally:
        monkeypatch.delenv("RINGPIPE_SHM_STREAM_REDUCE_MAX"), monkeypatch.delenv("RINGPIPE_SHM_STREAM_MIN")
        stream_store.reduce_max_bytes.cache_clear(), stream_store._min_bytes.cache_clear()


def test_the_private_cache_is_read_from_sysfs_and_a_shared_or_missing_one_is_none():
    real = stream_store.private_cache_bytes(0)
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache/index2"):
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE") if "SC_LEVEL2_CACHE_SIZE" in os.sysconf_names else 0
        shared = open("/sys/devices/system/cpu/cpu0/cache/index2/shared_cpu_list").read().strip() != "0"
        assert real == (None if shared else size or real)
    assert stream_store.private_cache_bytes(10**6) is None  # no such CPU


# ---- the round ----------------------------------------------------------------------------------------
PATHS = ("both", "strided", "python loop", "numpy sums", "async", "async strided")


def halves_on_every_path(comm):
    """Every case on the latency path's round on both ranks; then with rank 1 on the Python path (a
    non-contiguous array: shm_collectives._reduce_round with the C chunk loop), then in its Python
    loop (RINGPIPE_SHM_CHUNKS=0), then in it with NumPy's sums (reduce_kernels' "numpy" mode), then
    asynchronous on rank 0 (on the channel's thread: the round itself, then, for a strided array, the
    Python path).
    Per case and path: the result's bytes, the publishes and whether this rank's call took the round."""
    comm.barrier()
    channel = comm.engine.channels[comm.group.gid]
    out = []
    try:
        for path in PATHS:
            os.environ["RINGPIPE_SHM_CHUNKS"] = "0" if path == "python loop" and comm.rank == 1 else "1"
            reduce_kernels.set_mode("numpy" if path == "numpy sums" and comm.rank == 1 else "c")
            for case, (dtype, count, op) in enumerate(CASES):
                x = rank_input(dtype, count, comm.rank, case)
                if (path == "strided" and comm.rank == 1) or (path == "async strided" and comm.rank == 0):
                    x = np.repeat(x, 2)[::2]
                channel.small.ctl[shm_small.C_KIND] = -1
                published = channel.count
                with np.errstate(over="ignore"):
                    if path.startswith("async") and comm.rank == 0:
                        result = comm.all_reduce(x, op=op, async_op=True).wait()
                    else:
                        result = comm.all_reduce(x, op=op)
                took = int(channel.small.ctl[shm_small.C_KIND]) == shm_small.KIND_HALVES
                out.append((path, case, np.ascontiguousarray(result).tobytes(), channel.count - published, took))
    finally:  # (the cluster is shared with other tests)
        os.environ.pop("RINGPIPE_SHM_CHUNKS", None)
        reduce_kernels.set_mode("c")
    return out


@needs_c
@needs_cores
@pytest.mark.timeout(90)
def test_the_round_gives_numpys_rank_order_bits_and_meets_members_on_every_python_path(local_cluster):
    first, second = local_cluster(2).run(halves_on_every_path)
    assert len(first) == len(second) == len(PATHS) * len(CASES)
    for (path, case, got, published, took), (_, _, other, other_published, other_took) in zip(first, second):
        # The round is the chunk loop in C: where that is off (RINGPIPE_SHM_CHUNKS=0, NumPy's sums), the Python loop runs.
        assert other_took == (path in ("both", "async", "async strided")), (path, case)
        dtype, count, op = CASES[case]
        want = in_rank_order([rank_input(dtype, count, rank, case) for rank in (0, 1)], op).astype(dtype)
        assert got == other == want.tobytes(), (path, case)
        assert published == other_published == 2 * chunks(dtype, count), (path, case)  # per chunk: copy in, sums
        assert took == (path != "async strided"), (path, case)


def halves_mismatch_bytes_and_timeout(comm, asynchronous=False):
    """A mismatch (sizes differ by rank), one between the round and the one-round reduce, then the
    bytes one round counts as sent and a sum (the channel goes on), then a round that only rank 1
    calls (last: a timed-out collective leaves the group to the call's end, where the runtime fences
    it). `asynchronous`: every all_reduce on the channel's thread (the round there, numbered at the
    call). Rank 0 comes late to the sum, past the spin."""
    def all_reduce(x, **kwargs):
        return comm.all_reduce(x, async_op=True, **kwargs).wait() if asynchronous else comm.all_reduce(x, **kwargs)

    comm.barrier()
    channel = comm.engine.channels[comm.group.gid]
    found = {}
    try:
        all_reduce(np.ones(40000 + 8 * comm.rank, np.float32))
    except CollectiveMismatch as exc:
        found["mismatch"] = str(exc)
    try:  # rank 0 in the round (two publishes when done), rank 1 in the one-round reduce (one)
        all_reduce(np.ones(40000 if comm.rank == 0 else 1000, np.float32))
    except CollectiveMismatch as exc:
        found["paths"] = str(exc)
    comm.barrier()
    before = comm.bytes_sent
    all_reduce(np.ones(40000, np.float32))
    found["sent"] = comm.bytes_sent - before
    if comm.rank == 0:
        time.sleep(0.2)  # rank 1 sleeps in the round's wait
    channel.small.ctl[shm_small.C_KIND] = -1
    found["after"] = float(all_reduce(np.full(40000, comm.rank + 1.0, np.float32)).min())
    found["took"] = int(channel.small.ctl[shm_small.C_KIND]) == shm_small.KIND_HALVES
    comm.barrier()
    if comm.rank == 1:
        try:
            all_reduce(np.ones(40000, np.float32), timeout=0.5)
        except TimeoutError as exc:
            found["timeout"] = str(exc)
    return found


@needs_c
@needs_cores
@pytest.mark.timeout(60)
@pytest.mark.parametrize("asynchronous", [False, True], ids=["waited", "asynchronous"])
def test_the_round_names_a_mismatch_counts_its_bytes_and_times_out_naming_the_peer(local_cluster, asynchronous):
    first, second = local_cluster(2).run(halves_mismatch_bytes_and_timeout, asynchronous, timeout=30)
    for rank, found in enumerate((first, second)):
        assert f"rank {rank} called it with op=all_reduce, shape=[{40000 + 8 * rank}]" in found["mismatch"]
        assert f"rank {1 - rank} with op=all_reduce, shape=[{40000 + 8 * (1 - rank)}]" in found["mismatch"]
        assert "shape=[40000]" in found["paths"] and "shape=[1000]" in found["paths"]
        assert found["sent"] == 2 * (2 - 1) * (40000 * 4 // 2)  # 2 (n - 1) / n of the bytes, as the ring's
        assert found["after"] == 3.0 and found["took"]
    assert "timeout" not in first
    assert re.match(r"all_reduce #\d+ on group w \(rank 1 of 2\) on rank 1 timed out after 0.5s", second["timeout"])
    assert second["timeout"].endswith("waiting for a message from rank 0"), second["timeout"]


def halves_sum(comm):
    return float(comm.all_reduce(np.ones(40000, np.float32)).max())


@needs_c
@needs_cores
@pytest.mark.timeout(60)
def test_a_rank_waiting_in_the_round_wakes_when_its_peer_raises(local_cluster):
    cluster = local_cluster(2)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="bad input on purpose"):
        cluster.run(fail_during_waits, 40000, timeout=30)
    assert time.monotonic() - start < 20.0  # far below the collective's 60 s timeout
    assert cluster.run(halves_sum) == [2.0, 2.0]


@needs_c
@pytest.mark.timeout(60)
def test_a_wake_without_the_awaited_member_returns_the_rounds_call_for_its_caller_to_look():
    """An abort or a destroyed group wakes the sleeper (GroupChannel._wake_sleeper) without the member
    it waits for: the round's C call returns PENDING then, as the one-round wait does, instead of
    sleeping on to the end of its slice (a real channel layout in this process; member 1 never comes)."""
    lib, buffer_bytes = shm_wait.waiter("c")._lib, 1 << 16
    regions = [np.zeros(shm_channel.region_bytes(buffer_bytes), np.uint8) for _ in range(2)]
    words = [int(region.ctypes.data) for region in regions]
    engine = SimpleNamespace(tracer=None, send_lock=threading.Lock(), bytes_sent={})
    channel = SimpleNamespace(n=2, me=0, buffer_bytes=buffer_bytes, words=words, sleepers=[w + 8 for w in words],
                              spin=shm_wait.Spin(False), engine=engine, lock=threading.Lock(), _written=[None, None],
                              host_ranks=2,
                              group=SimpleNamespace(gid=0))
    small = shm_small.SmallRounds(channel, lib)
    if small.ext is None:
        pytest.skip("no extension here")
    x, found = np.ones(10000, np.float32), {}
    target = (1 << shm_channel.EPOCH_SHIFT) | 1

    def round_alone():  # (parity 0, signature 7, position 0, no spin, a 20 s slice; float32 sum in one chunk)
        found["status"] = small.ext.halves(small.address, x, 0, target, 7, 0, 0, 0, 20 * 10**9, 0, 0, x.size, 0,
                                           x.size)

    thread = threading.Thread(target=round_alone)
    thread.start()
    deadline = time.monotonic() + 10.0
    while thread.is_alive() and time.monotonic() < deadline:
        if small.sleeping_on():
            lib.rp_wake(small.sleeping_on())  # (again until it returns: a wake before its sleep is lost)
        time.sleep(0.01)
    returned = not thread.is_alive()
    if not returned:  # let it end: member 1 "publishes" with another signature (a mismatch)
        lib.rp_publish(words[1], words[1] + 8, target + 1)
    thread.join(30)
    assert returned, "the round slept on after a wake without member 1"
    assert found["status"] == shm_small.PENDING and int(small.ctl[shm_small.C_PEER]) == 1


def stream_thresholds(comm):
    """(this job's ranks on the host as the pair rings know them, the stream threshold of a group of
    ranks 0 and 1's channel: None outside it)."""
    group = comm.new_group([0, 1])
    if group is None:
        return comm.engine.rings.host_ranks, None
    group.barrier()
    channel = comm.engine.channels[group.group.gid]
    return comm.engine.rings.host_ranks, int(channel.small.ctl[shm_small.C_STREAM_MIN])


@pytest.mark.timeout(60)
def test_streaming_goes_by_the_job_s_ranks_on_the_host_not_a_group_s_members(local_cluster):
    ranks = len(os.sched_getaffinity(0)) + 1  # (a group of two fits the cores; the host's ranks do not)
    if ranks > 8:
        pytest.skip(f"{ranks} ranks: too many processes for a test")
    found = local_cluster(ranks).run(stream_thresholds)
    assert found == [[ranks, 0], [ranks, 0]] + [[ranks, None]] * (ranks - 2)
    assert local_cluster(2).run(stream_thresholds) == [[2, stream_store.stream_min_bytes(2)]] * 2


def streamed_copies(comm):
    """Each operation of 32 KiB and of 128 KiB on the Python paths; [(op, bytes, whether the copies for
    peers streamed)] from what stream_store.copy was asked."""
    asked, out, real = [], [], stream_store.copy

    def copy(dst, src, stream_min):
        if src.nbytes:  # (a rank's own row of a reduce_scatter leaves an empty copy)
            asked.append(0 < stream_min <= src.nbytes)
        real(dst, src, stream_min)

    stream_store.copy = copy
    try:
        for nbytes in (32 << 10, 128 << 10):
            x = np.full(nbytes // 4, comm.rank + 1.0, np.float32)
            operations = {"all_reduce": lambda: comm.all_reduce(x.copy()),
                          "reduce_scatter": lambda: comm.reduce_scatter(x),
                          "broadcast": lambda: comm.broadcast(x.copy(), src=0),
                          "all_gather": lambda: comm.all_gather(x),
                          "send": lambda: comm.send(x, 1) if comm.rank == 0 else comm.recv(0)}
            for name, run in operations.items():
                del asked[:]
                comm.barrier()
                run()
                if asked:
                    out.append((name, nbytes, sorted(set(asked))))
        return out
    finally:
        stream_store.copy = real


@pytest.mark.timeout(60)
def test_reductions_above_the_limit_stream_nothing_and_what_a_peer_reads_once_streams_at_every_size():
    """RINGPIPE_SHM_STREAM_REDUCE_MAX bounds what an all_reduce or a reduce_scatter (on either path)
    streams; a broadcast's, an all_gather's and a send's payloads stream at every size
    (runtime/stream_store.py says why)."""
    from ringpipe.runtime import Cluster

    if shm_collectives.HOST_CORES < 2:
        pytest.skip("one core: nothing streams with two ranks")
    env = {"RINGPIPE_SHM_STREAM_REDUCE_MAX": str(64 << 10), "RINGPIPE_SHM_SMALL": "0", "RINGPIPE_SHM_P2P_C": "0",
           "RINGPIPE_SHM_CHUNKS": "0", "RINGPIPE_CMA": "0"}
    with Cluster(2, env=env) as cluster:
        found = cluster.run(streamed_copies)
    copied = {(name, nbytes): streamed for rank in found for name, nbytes, streamed in rank}
    assert {name for name, _ in copied} == {"all_reduce", "reduce_scatter", "broadcast", "all_gather", "send"}
    for (name, nbytes), streamed in copied.items():
        reduction = name in ("all_reduce", "reduce_scatter")
        assert streamed == [nbytes <= 64 << 10 or not reduction], (name, nbytes, streamed)


def arrival_and_whole_waits(comm):
    """Back-to-back 1 MiB rounds with both ranks' adaptive spin forced to its shortest: each round's
    arrival wait (C_ARRIVAL_NS, what the spin learns from) and its whole wait (C_WAITED_NS)."""
    x = np.ones(1 << 18, np.float32)
    comm.all_reduce(x)
    channel = comm.engine.channels[comm.group.gid]
    words = channel.small.words
    channel.spin._ns = shm_wait.MIN_SPIN_NS
    comm.barrier()
    parts = []
    for _ in range(40):
        words[shm_small.C_KIND] = -1
        comm.all_reduce(x)
        parts.append((int(words[shm_small.C_KIND]), int(words[shm_small.C_ARRIVAL_NS]),
                      int(words[shm_small.C_WAITED_NS])))
    return parts, float(x[0])


@needs_c
@needs_cores
@pytest.mark.timeout(60)
def test_the_round_reports_its_arrival_wait_apart_from_its_whole_wait(local_cluster):
    """(How long the waits are depends on the machine's load; that the arrival's is a part of the
    whole, and is what the round's caller hands the spin, does not: runtime/shm_small.py.)"""
    for parts, value in local_cluster(2).run(arrival_and_whole_waits):
        assert value == 2.0 ** 41  # (40 sums of two after the first)
        assert all(kind == shm_small.KIND_HALVES and 0 <= arrival <= waited for kind, arrival, waited in parts)

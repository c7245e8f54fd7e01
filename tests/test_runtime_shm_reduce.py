"""The sums of same-host collectives (runtime/reduce_kernels.py with csrc/reduce_sum.c, and its NumPy
fallback) and the large all_reduce over a group channel, pipelined in chunks
(runtime/shm_collectives.py; its chunk loop in C, runtime/shm_reduce_chunks.py, or in Python):
NumPy's results, bit for bit, in every mode."""
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ringpipe.runtime import reduce_kernels, shm_cma, shm_collectives, shm_reduce_chunks
from ringpipe.runtime.reduce_kernels import reduce_into

MODES = ["c", "numpy"]
SMALL_ARENA = 1 << 20  # channel buffers of 64 KiB: the cases below go in several rounds


@pytest.fixture(params=MODES)
def reduce_mode(request):
    if request.param == "c" and reduce_kernels.unavailable_reason():
        pytest.skip(f"no C kernel here: {reduce_kernels.unavailable_reason()}")
    reduce_kernels.set_mode(request.param)
    assert reduce_kernels.mode() == request.param
    yield request.param
    reduce_kernels.set_mode("c")


def rank_order_sum(inputs, divisor=0):
    total = inputs[0] + inputs[1]
    for x in inputs[2:]:
        total = total + x
    return total / divisor if divisor else total


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_sum_adds_in_rank_order_with_numpys_bits_and_divides_for_an_average(reduce_mode, dtype):
    rng = np.random.default_rng(0)
    for count in (2, 3, 4):
        for divisor in (0, count):
            inputs = [(rng.standard_normal(5003) * 10.0 ** rng.integers(-4, 5, 5003)).astype(dtype)
                      for _ in range(count)]
            out, copy = np.empty(5003, dtype), np.empty(5003, dtype)
            reduce_into(np.add, inputs, out, copy, divisor)
            want = rank_order_sum(inputs, divisor)
            assert same_bits(out, want) and same_bits(copy, want), (count, divisor)


def test_a_sum_may_write_over_its_first_two_inputs_and_copy_over_any(reduce_mode):
    rng = np.random.default_rng(1)
    for into in (0, 1):
        inputs = [rng.standard_normal(3001).astype(np.float32) for _ in range(4)]
        want = rank_order_sum(inputs)
        copy_over = inputs[3].copy()
        reduce_into(np.add, inputs[:3] + [copy_over], inputs[into], copy_over)
        assert same_bits(inputs[into], want) and same_bits(copy_over, want), into


def test_other_reductions_and_dtypes_give_numpys_results(reduce_mode):
    a, b = np.array([1.0, np.nan, -2.0], np.float32), np.array([3.0, 0.0, np.nan], np.float32)
    out = np.empty(3, np.float32)
    reduce_into(np.maximum, [a, b], out)
    assert same_bits(out, np.maximum(a, b))
    ints = [np.arange(7, dtype=np.int64) * k for k in (1, 2, 3)]
    out = np.empty(7, np.int64)
    reduce_into(np.add, ints, out)
    assert same_bits(out, ints[0] + ints[1] + ints[2])


# ---- the pipelined all_reduce over the channel ---------------------------------------------------
CASES = [("float32", 50_001, "sum"), ("float64", 20_000, "avg"), ("int64", 9_999, "sum"), ("float32", 30_000, "max")]


def pipelined_all_reduces(comm, mode, chunk_bytes, python_loop_ranks=()):
    """Each case on rank-dependent random data, with chunks of `chunk_bytes` and the one-round reduce
    off and the single-copy path too (runtime/shm_cma.py), so that every case takes the pipelined
    path; the ranks in `python_loop_ranks` run its Python loop, the others the C one where it takes
    the case (runtime/shm_reduce_chunks.py); (input, result, publishes) per case."""
    names = ("CHUNK_BYTES", "SMALL_BYTES", "ONE_ROUND_BYTES")
    saved = [getattr(shm_collectives, name) for name in names] + [dict(shm_cma.MIN_READ_BYTES)]
    for name, value in zip(names, (chunk_bytes, 0, 0)):
        setattr(shm_collectives, name, value)
    shm_cma.MIN_READ_BYTES.update(all_reduce=None)
    reduce_kernels.set_mode(mode)
    os.environ["RINGPIPE_SHM_CHUNKS"] = "0" if comm.rank in python_loop_ranks else "1"
    in_c = []
    real = shm_reduce_chunks.reduce_round
    shm_reduce_chunks.reduce_round = lambda *args: in_c.append(real(*args)) or in_c[-1]
    try:
        comm.barrier()
        channel = comm.engine.channels[comm.group.gid]
        out = []
        for index, (dtype, count, op) in enumerate(CASES):
            rng = np.random.default_rng(10 * index + comm.rank)
            x = (rng.standard_normal(count) * 100).astype(dtype)
            before, published = x.copy(), channel.count
            del in_c[:]
            comm.all_reduce(x, op=op)
            out.append((before, x, channel.count - published, all(in_c) and len(in_c) > 0))
        return out
    finally:
        shm_reduce_chunks.reduce_round = real
        for name, value in zip(names, saved):
            setattr(shm_collectives, name, value)
        shm_cma.MIN_READ_BYTES.update(saved[-1])
        reduce_kernels.set_mode("c")
        os.environ.pop("RINGPIPE_SHM_CHUNKS", None)


# The chunk loop in C on every rank, in Python on every rank (with C or NumPy sums), and in C on
# rank 0 only: members in either loop meet, with the same bits.
LOOPS = {"c": ("c", ()), "python": ("c", (0, 1, 2)), "numpy": ("numpy", ()), "mixed": ("c", (1, 2))}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_large_all_reduce_in_pipelined_chunks_matches_numpy_on_every_rank(local_cluster, loop, world_size):
    mode, python_loop_ranks = LOOPS[loop]
    if mode == "c" and reduce_kernels.unavailable_reason():
        pytest.skip(f"no C kernel here: {reduce_kernels.unavailable_reason()}")
    chunk_bytes = 16 << 10  # several chunks per 64 KiB buffer, several buffers per case
    results = local_cluster(world_size, arena_bytes=SMALL_ARENA).run(pipelined_all_reduces, mode, chunk_bytes,
                                                                      python_loop_ranks)
    for index, (dtype, count, op) in enumerate(CASES):
        inputs = [results[rank][index][0] for rank in range(world_size)]
        if op == "max":
            want = np.maximum.reduce(inputs)
        else:
            want = rank_order_sum(inputs, world_size if op == "avg" else 0).astype(dtype)
        itemsize = np.dtype(dtype).itemsize
        per_buffer = (64 << 10) // itemsize
        chunked = world_size <= (os.cpu_count() or 1)
        per_chunk = max(world_size, chunk_bytes // itemsize) if chunked else per_buffer
        chunks = sum(-(-min(per_buffer, count - start) // per_chunk) for start in range(0, count, per_buffer))
        for rank in range(world_size):
            assert same_bits(results[rank][index][1], want), (dtype, op, rank)
            # two publishes per chunk: its copy in and its sum
            assert results[rank][index][2] == 2 * chunks, (dtype, op, rank)
            assert results[rank][index][3] == (mode == "c" and rank not in python_loop_ranks), (dtype, op, rank)


def reduce_scatters(comm, mode):
    """An average and a max over the channel, rank-dependent data over several buffers; (input, result) each."""
    reduce_kernels.set_mode(mode)
    try:
        comm.barrier()
        out = []
        for index, op in enumerate(("avg", "max")):
            rng = np.random.default_rng(10 * index + comm.rank)
            x = (rng.standard_normal(comm.size * 20_001) * 100).astype(np.float32)
            out.append((x, comm.reduce_scatter(x, op=op)))
        return out
    finally:
        reduce_kernels.set_mode("c")


@pytest.mark.timeout(120)
def test_a_reduce_scatter_reads_its_own_row_in_place_and_averages_in_the_same_pass(local_cluster, reduce_mode):
    results = local_cluster(3, arena_bytes=SMALL_ARENA).run(reduce_scatters, reduce_mode)
    for index, op in enumerate(("avg", "max")):
        rows = [np.split(results[rank][index][0], 3) for rank in range(3)]
        for rank in range(3):
            mine = [rows[peer][rank] for peer in range(3)]
            want = rank_order_sum(mine, 3) if op == "avg" else np.maximum.reduce(mine)
            assert same_bits(results[rank][index][1], want.astype(np.float32)), (op, rank)


def test_a_c_helper_is_rebuilt_when_a_header_it_may_include_changes(tmp_path, monkeypatch):
    """csrc/reduce_loops.h holds the loops of reduce_sum.c and shm_small.c: the build cache's key
    covers the headers, so an edited loop never runs as the stale library."""
    from ringpipe.runtime import c_library

    if reduce_kernels.unavailable_reason():
        pytest.skip(f"no C compiler here: {reduce_kernels.unavailable_reason()}")
    sources = tmp_path / "csrc"
    sources.mkdir()
    for path in c_library.SOURCES.glob("*"):
        (sources / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(c_library, "SOURCES", sources)
    monkeypatch.setenv("RINGPIPE_CACHE", str(tmp_path / "cache"))
    c_library.build("reduce_sum")
    header = sources / "reduce_loops.h"
    header.write_text(header.read_text() + "\n/* edited */\n")
    c_library.build("reduce_sum")
    assert len(list((tmp_path / "cache").glob("reduce_sum-*.so"))) == 2


def test_every_c_helper_with_reduction_loops_is_built_with_them_vectorized():
    """gcc's -O2 vectorizes only loops whose trip count it knows: the reduction loops of
    csrc/reduce_loops.h then ran one element at a time (a 2-rank 64 KiB all_reduce round took 21 µs
    in C where ~9 µs does it). Every helper is built with c_library.FLAGS, and with them gcc reports
    the loops of each source that includes the header as vectorized."""
    import re
    import shutil
    import subprocess

    from ringpipe.runtime import c_library

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: its vectorizer report is what this test reads")
    tree = Path(c_library.__file__).resolve().parent
    for module in tree.glob("*.py"):  # no helper passes flags of its own
        assert not re.search(r'"-O[0-3s]"', module.read_text().replace('FLAGS = ("-O3"', "")), module.name
    for source in sorted(c_library.SOURCES.glob("*.c")):
        if "reduce_loops.h" not in source.read_text():
            continue
        report = subprocess.run([gcc, *c_library.FLAGS, "-c", "-o", "/dev/null", "-fopt-info-vec-optimized",
                                 str(source)], capture_output=True, text=True, timeout=120)
        assert report.returncode == 0, report.stderr
        assert "reduce_loops.h" in report.stderr and "loop vectorized" in report.stderr, source.name


def large_mismatch_and_timeout(comm):
    """A 2 MiB all_reduce (the chunk loop: above the one-round size) whose shapes differ between the
    ranks, then one that only rank 1 calls; the two errors' messages."""
    from ringpipe.runtime.operations import CollectiveMismatch

    messages = []
    comm.barrier()
    try:
        comm.all_reduce(np.ones((1 << 19) + 4 * comm.rank, np.float32))
    except CollectiveMismatch as exc:
        messages.append(str(exc))
    comm.barrier()
    if comm.rank == 1:
        try:
            comm.all_reduce(np.ones(1 << 19, np.float32), timeout=0.5)
        except TimeoutError as exc:
            messages.append(str(exc))
    return messages


@pytest.mark.timeout(60)
def test_the_chunk_loop_in_c_checks_signatures_and_times_out_naming_the_peer(local_cluster):
    if reduce_kernels.unavailable_reason():
        pytest.skip(f"no C kernel here: {reduce_kernels.unavailable_reason()}")
    first, second = local_cluster(2).run(large_mismatch_and_timeout, timeout=30)
    for rank, messages in enumerate((first, second)):
        assert f"rank {rank} called it with op=all_reduce, shape=[{(1 << 19) + 4 * rank}]" in messages[0]
        assert f"rank {1 - rank} with op=all_reduce, shape=[{(1 << 19) + 4 * (1 - rank)}]" in messages[0]
    assert len(first) == 1 and "timed out after 0.5s waiting for a message from rank 0" in second[1]


def bytes_sent_per_path(comm):
    """A 768 KiB all_reduce (above the channel's 64 KiB buffer: the pipelined path) through the C
    chunk loop, the Python one, the single-copy path where this group can take it, and the engine's
    ring; the payload bytes each counted as sent by this rank."""
    x = np.ones(3 << 16, np.float32)
    saved, pipelined = dict(shm_cma.MIN_READ_BYTES), set(shm_cma.PIPELINED)
    shm_cma.PIPELINED.clear()
    counted = {}
    try:
        comm.barrier()
        for path in ("c", "python", "single copy", "ring"):
            os.environ["RINGPIPE_SHM_CHUNKS"] = "0" if path == "python" else "1"
            shm_cma.MIN_READ_BYTES.update(all_reduce=1 if path == "single copy" else None)
            before = comm.bytes_sent
            (comm.using(algorithm="ring") if path == "ring" else comm).all_reduce(x)
            counted[path] = comm.bytes_sent - before
        return counted
    finally:
        shm_cma.MIN_READ_BYTES.update(saved)
        shm_cma.PIPELINED.update(pipelined)
        os.environ.pop("RINGPIPE_SHM_CHUNKS", None)


@pytest.mark.timeout(60)
def test_a_large_same_host_all_reduce_counts_the_bytes_the_ring_counts_on_every_path(local_cluster):
    """Each rank sends 2 (n - 1) / n of the array's bytes, as the ring does: bytes, not elements."""
    for counted in local_cluster(2, arena_bytes=SMALL_ARENA).run(bytes_sent_per_path):
        assert counted["ring"] == 2 * (3 << 16) * 4 // 2, counted
        assert counted["c"] == counted["python"] == counted["single copy"] == counted["ring"], counted


class LockstepMember:
    """One member of a 2-member group channel in this process, for the C chunk loop
    (runtime/shm_reduce_chunks.py): no spin, so every wait the loop cannot pass returns to Python,
    where this member hands the turn to the other and waits for it back. The two members take
    turns, each running until it waits on the other, so the loop resumes after every such wait."""

    def __init__(self, me, regions, buffer_bytes, turn):
        from ringpipe.runtime import shm_wait

        self.n, self.me, self.turn, self.buffer_bytes, self.host_ranks = 2, me, turn, buffer_bytes, 2
        self.waiter, self.spin = shm_wait.waiter("c"), SimpleNamespace(ns=lambda: 0, inside_ns=lambda: 0, yields=False)
        self.words = [int(region.ctypes.data) for region in regions]
        self.sleepers = [word + 8 for word in self.words]
        self.counters = [region[:8].view(np.uint64) for region in regions]
        self.epoch, self.count, self.rounds, self.wait_ns, self.waited_at, self.checked = 0, 0, 0, 0, [], 0

    def next_round(self):
        self.rounds += 1
        return (self.rounds - 1) & 1

    def buffer_address(self, member, parity):
        return self.words[member] + 64 + parity * self.buffer_bytes

    def write_signature(self, parity):
        pass

    def check_signatures(self, parity):
        self.checked += 1

    def _wait(self, peer, target, inside=False):
        state = self._chunk_states[(self.rounds - 1) & 1][0]  # (this round's parity)
        self.waited_at.append((int(state[shm_reduce_chunks.R_INDEX]), int(state[shm_reduce_chunks.R_STEP]),
                               self.count - target))
        with self.turn:
            self.turn.holder = peer
            self.turn.notify_all()
            assert self.turn.wait_for(lambda: self.turn.holder == self.me or self.turn.holder is None, timeout=10)
        assert self.counters[peer][0] >= target, (self.me, peer, target)


def test_the_c_chunk_loop_resumes_after_each_wait_with_the_python_loops_targets_and_numpys_bits():
    """Each wait is the Python loop's (shm_collectives._reduce_round): for the peers' copies of a chunk,
    as many publishes as this member's (step 1); for their sums, one fewer (behind=1: the next
    chunk's copy was published since), none fewer after the last chunk (step 3). The signatures
    are checked once, after the first wait."""
    if reduce_kernels.unavailable_reason():
        pytest.skip(f"no C kernel here: {reduce_kernels.unavailable_reason()}")
    from ringpipe.runtime.shm_wait import unavailable_reason

    if unavailable_reason("c"):
        pytest.skip(f"no C wait helper here: {unavailable_reason('c')}")
    import threading

    count, chunk, buffer_bytes = 1001, 97, 4096 * 4  # 11 chunks, the last one short
    regions = [np.zeros(64 + 2 * buffer_bytes, np.uint8) for _ in range(2)]
    turn = threading.Condition()
    turn.holder = 0
    members = [LockstepMember(me, regions, buffer_bytes, turn) for me in range(2)]
    inputs = [np.random.default_rng(me).standard_normal(count).astype(np.float32) for me in range(2)]
    pieces, done = [x.copy() for x in inputs], []

    def run(member):
        with turn:
            turn.wait_for(lambda: turn.holder == member.me)
        done.append(shm_reduce_chunks.reduce_round(member, pieces[member.me], np.add, 0, True, chunk))
        with turn:  # the other member finishes alone
            turn.holder = None
            turn.notify_all()

    threads = [threading.Thread(target=run, args=(member,)) for member in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert done == [True, True]
    for me, member in enumerate(members):
        assert same_bits(pieces[me], inputs[0] + inputs[1]), me
        assert member.count == 2 * 11, me  # two publishes per chunk: its copy in and its sum
        assert member.checked == 1, me
    waits = sorted(members[0].waited_at + members[1].waited_at)
    assert {index for index, _, _ in waits} == set(range(11)), waits  # a wait in every chunk
    for index, step, behind in waits:
        assert (step, behind) == ((1, 0) if step == 1 else (3, 0 if index == 10 else 1)), waits
    # whole chunks take turns in two chunk-sized slots of each buffer, the short last one (elements
    # 970..1000) sits at its own place: nothing else of the buffers was written
    for region in regions:
        written = np.flatnonzero(region[64 : 64 + buffer_bytes].view(np.float32))
        assert set(written) <= set(range(2 * chunk)) | set(range(970, count)), written
        assert written.max() >= 970 and written.min() < chunk
        assert not region[64 + buffer_bytes :].any()  # a round writes one parity's buffer

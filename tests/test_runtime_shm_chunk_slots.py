"""Stress of the pipelined all_reduce's chunk slots (shm_collectives.chunk_start, csrc/shm_reduce_chunks.c's
at()): many back-to-back all_reduces of sizes around the chunk and buffer boundaries (short last
chunks, pieces of one to several buffers, consecutive rounds alternating parity), each member taking
the C chunk loop, the latency path's KIND_HALVES round or the Python loop (C or NumPy sums), chosen per
call and per rank, some calls asynchronous and some ranks late: NumPy's bits on every rank."""
import os
import time

import numpy as np
import pytest

from ringpipe.runtime import reduce_kernels, shm_cma, shm_collectives, shm_reduce_chunks, shm_small

SMALL_ARENA = 1 << 20  # 64 KiB buffers
CHUNK_BYTES = 4100  # not a divisor of the buffer: every full round ends in a short chunk
DTYPES = ["float32", "float64", "int64", "int32"]
# per call, per rank: "c" (the C loop or KIND_HALVES), "python" (Python loop, C sums), "numpy" (Python
# loop, NumPy sums), "async" (the channel's thread: KIND_HALVES within a buffer, else the C loop),
# "strided" (a view the latency path does not take: shm_collectives.all_reduce's C loop on a copy)
WAYS = ["c", "python", "numpy", "async", "strided"]


def cases(world_size: int, count: int, seed: int):
    """The same (dtype, size, op, ways, late rank, late seconds) list on every rank."""
    rng = np.random.default_rng(seed)
    buffer_bytes = 64 << 10
    out = []
    for _ in range(count):
        dtype = DTYPES[rng.integers(len(DTYPES))]
        itemsize = np.dtype(dtype).itemsize
        chunk, per_round = max(world_size, CHUNK_BYTES // itemsize), buffer_bytes // itemsize
        kind = rng.integers(5)
        if kind == 0:  # around a whole number of chunks within one buffer
            size = int(rng.integers(1, per_round // chunk + 1)) * chunk + int(rng.integers(-2, 3))
        elif kind == 1:  # around a whole number of buffers
            size = int(rng.integers(1, 4)) * per_round + int(rng.integers(-2, 3))
        elif kind == 2:  # buffers and chunks
            size = int(rng.integers(1, 3)) * per_round + int(rng.integers(0, 4)) * chunk + int(rng.integers(-2, 3))
        elif kind == 3:  # under two chunks: the short chunk in slot 1's place
            size = int(rng.integers(1, 2 * chunk))
        else:
            size = int(rng.integers(1, 3 * per_round))
        ops = ["sum", "max"] + (["avg"] if dtype.startswith("float") else [])
        op = ops[rng.integers(len(ops))]
        ways = [WAYS[w] for w in rng.integers(len(WAYS), size=world_size)]
        late = int(rng.integers(world_size))
        out.append((dtype, max(1, size), op, ways, late, float(rng.choice([0.0, 0.0, 2e-4, 2e-3]))))
    return out


def stressed_all_reduces(comm, count, seed):
    """Each case on rank-dependent random data; (input, result, path) per case."""
    world_size = comm.size
    saved = {name: getattr(shm_collectives, name) for name in
             ("CHUNK_BYTES", "SMALL_BYTES", "ONE_ROUND_BYTES", "ONE_ROUND_CORES_BYTES", "HOST_CORES")}
    saved_reads = dict(shm_cma.MIN_READ_BYTES)
    # every size pipelined, in chunks even with more ranks than this machine's cores (alike on every rank)
    shm_collectives.CHUNK_BYTES, shm_collectives.SMALL_BYTES = CHUNK_BYTES, 0
    shm_collectives.ONE_ROUND_BYTES = shm_collectives.ONE_ROUND_CORES_BYTES = 0
    shm_collectives.HOST_CORES = max(world_size, 8)
    shm_cma.MIN_READ_BYTES.update(all_reduce=None)
    paths = []
    real_round, real_run = shm_reduce_chunks.reduce_round, shm_small.SmallRounds._run

    def reduce_round(*args):
        taken = real_round(*args)
        paths.append("c loop" if taken else "python loop")
        return taken

    def run(self, comm, name, signature, kind, *args, **kwargs):
        done = real_run(self, comm, name, signature, kind, *args, **kwargs)
        if kind == shm_small.KIND_HALVES and done != shm_small.NOT_RUN:
            paths.append("halves")
        return done

    shm_reduce_chunks.reduce_round, shm_small.SmallRounds._run = reduce_round, run
    try:
        comm.barrier()
        out = []
        for index, (dtype, size, op, ways, late, delay) in enumerate(cases(world_size, count, seed)):
            way = ways[comm.rank]
            reduce_kernels.set_mode("numpy" if way == "numpy" else "c")
            os.environ["RINGPIPE_SHM_CHUNKS"] = "0" if way in ("python", "numpy") else "1"
            rng = np.random.default_rng(1000 * seed + 10 * index + comm.rank)
            x = (rng.standard_normal(size) * 100).astype(dtype)
            before = x.copy()
            del paths[:]
            if comm.rank == late and delay:
                time.sleep(delay)
            if way == "async":
                comm.all_reduce(x, op=op, async_op=True).wait()
            elif way == "strided":
                holder = np.zeros(2 * size, dtype)
                holder[::2] = x
                x = comm.all_reduce(holder[::2], op=op)
            else:
                comm.all_reduce(x, op=op)
            out.append((before, x, sorted(set(paths))))
        comm.barrier()
        return out
    finally:
        shm_reduce_chunks.reduce_round, shm_small.SmallRounds._run = real_round, real_run
        for name, value in saved.items():
            setattr(shm_collectives, name, value)
        shm_cma.MIN_READ_BYTES.update(saved_reads)
        reduce_kernels.set_mode("c")
        os.environ.pop("RINGPIPE_SHM_CHUNKS", None)


def numpys(inputs, op, dtype):
    if op == "max":
        return np.maximum.reduce(inputs)
    total = inputs[0] + inputs[1]
    for x in inputs[2:]:
        total = total + x
    return (total / len(inputs) if op == "avg" else total).astype(dtype)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_back_to_back_all_reduces_around_chunk_and_buffer_boundaries_on_mixed_loops_match_numpy(local_cluster,
                                                                                              world_size):
    if reduce_kernels.unavailable_reason():
        pytest.skip(f"no C kernel here: {reduce_kernels.unavailable_reason()}")
    count, seed = int(os.environ.get("RINGPIPE_TEST_SLOT_CASES", "60")), 7 + world_size
    results = local_cluster(world_size, arena_bytes=SMALL_ARENA).run(stressed_all_reduces, count, seed)
    met = set()  # pairs of loops that met in one call
    for index, (dtype, size, op, ways, _, _) in enumerate(cases(world_size, count, seed)):
        want = numpys([results[rank][index][0] for rank in range(world_size)], op, dtype)
        loops = set()
        for rank in range(world_size):
            got, path = results[rank][index][1], results[rank][index][2]
            loops.update(path)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (index, dtype, size, op, ways, rank,
                                                                                 path)
        met.update((a, b) for a in loops for b in loops if a < b)
    assert met == {("c loop", "halves"), ("c loop", "python loop"), ("halves", "python loop")}, met


# ---- the same layout under every interleaving: a happens-before check of the counter protocol --------
def _round_ops(prog, me, n, size, per_round, chunk, call, rounds):
    """Member `me`'s accesses, publishes and waits in one pipelined all_reduce (_reduce_round's order,
    which the C loop and KIND_HALVES share): ("w"|"r", owner, parity, lo, hi, tag), ("pub",),
    ("wait", behind)."""
    for start in range(0, size, per_round):
        piece, parity = min(per_round, size - start), rounds & 1
        rounds += 1
        spans = [[lo + (min(lo + chunk, piece) - lo) * i // n for i in range(n + 1)] for lo in range(0, piece, chunk)]
        shifts = [shm_collectives.chunk_start(b[0], chunk, piece) - b[0] for b in spans]

        def copy_in(k):
            b, s = spans[k], shifts[k]
            for lo, hi in ((b[0], b[me]), (b[me + 1], b[n])):
                if hi > lo:
                    prog.append(("w", me, parity, lo + s, hi + s, (call, start, k, "in")))

        copy_in(0)
        prog.append(("pub",))
        for k, b in enumerate(spans):
            s = shifts[k]
            prog.append(("wait", 0))
            prog.extend(("r", p, parity, b[me] + s, b[me + 1] + s, (call, start, k, "in")) for p in range(n) if p != me)
            prog.append(("w", me, parity, b[me] + s, b[me + 1] + s, (call, start, k, "sum")))
            prog.append(("pub",))
            if k + 1 < len(spans):
                copy_in(k + 1)
                prog += [("pub",), ("wait", 1)]
            else:
                prog.append(("wait", 0))
            prog.extend(("r", p, parity, b[p] + s, b[p + 1] + s, (call, start, k, "sum")) for p in range(n) if p != me)
    return rounds


def _one_round_ops(prog, me, n, size, call, rounds):
    """A plain round (one-round reduce, all_gather): write [0, size), publish, wait for all, read all."""
    parity = rounds & 1
    prog += [("w", me, parity, 0, size, (call, 0, 0, "one")), ("pub",), ("wait", 0)]
    prog.extend(("r", p, parity, 0, size, (call, 0, 0, "one")) for p in range(n) if p != me)
    return rounds + 1


def _races(progs):
    """Vector clocks from running the members' programs (a wait passes once every peer published as
    often as the waiter, less `behind`): a read must come after the write of what it wants, and before
    that member's every later write over the same element."""
    n = len(progs)
    pos, count, vc = [0] * n, [0] * n, [[0] * n for _ in range(n)]
    published, seen = [[None] for _ in range(n)], [[] for _ in range(n)]
    while any(pos[m] < len(progs[m]) for m in range(n)):
        moved = False
        for m in range(n):
            while pos[m] < len(progs[m]):
                op = progs[m][pos[m]]
                if op[0] == "wait":
                    target = count[m] - op[1]
                    if any(count[p] < target for p in range(n) if p != m):
                        break
                    for p in range(n):
                        if p != m:
                            vc[m] = [max(a, b) for a, b in zip(vc[m], published[p][target])]
                seen[m].append(list(vc[m]))
                pos[m] += 1
                vc[m][m] = pos[m]
                if op[0] == "pub":
                    count[m] += 1
                    published[m].append(list(vc[m]))
                moved = True
        assert moved, "deadlock"
    writes = {}
    for m, prog in enumerate(progs):
        for i, op in enumerate(prog):
            if op[0] == "w":
                for e in range(op[3], op[4]):
                    writes.setdefault((op[1], op[2], e), []).append((i, op[5]))
    races = []
    for m, prog in enumerate(progs):
        for j, (kind, owner, parity, lo, hi, want) in ((j, op) for j, op in enumerate(prog) if op[0] == "r"):
            for e in range(lo, hi):
                done = writes.get((owner, parity, e), [])
                mine = [i for i, tag in done if tag == want]
                if not mine or seen[m][j][owner] <= mine[-1]:
                    races.append(("read before its write", m, prog[j], e))
                    break
                later = [i for i, _ in done if i > mine[-1] and seen[owner][i][m] <= j]
                if later:
                    races.append(("overwritten while read", m, prog[j], e, progs[owner][later[0]]))
                    break
    return races


def test_no_chunk_slot_is_written_while_a_peer_may_still_read_it_under_any_interleaving():
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(2, 6))
        chunk = int(rng.integers(n, 12))
        per_round = int(rng.integers(chunk, 5 * chunk + 4))
        calls = []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.25:
                calls.append(("one", int(rng.integers(1, per_round + 1))))
            else:
                k = int(rng.integers(1, 5))
                calls.append(("reduce", max(1, int(rng.choice([k * chunk, k * chunk + int(rng.integers(-n, n + 1)),
                                                            int(rng.integers(1, 3 * per_round + 1))])))))
        progs = []
        for me in range(n):
            prog, rounds = [], 0
            for call, (kind, size) in enumerate(calls):
                rounds = (_round_ops(prog, me, n, size, per_round, chunk, call, rounds) if kind == "reduce"
                          else _one_round_ops(prog, me, n, size, call, rounds))
            progs.append(prog)
        assert not _races(progs), (n, chunk, per_round, calls)

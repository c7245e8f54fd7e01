"""Collective benchmark in the style of nccl-tests, with torch.distributed's gloo and OpenMPI (mpi4py)
side by side in the same run.

In every round each library runs in fresh processes; each (op, size) is first run once on
rank-dependent data and checked element by element (#wrong), then timed: `iterations(size)`
back-to-back calls after a barrier, the round's time = the slowest rank's mean. Each reported time
is the median of the rounds, interleaved ringpipe, peer, ringpipe, peer, ... (bench_rounds). Bus
bandwidth uses the nccl-tests factors: all_reduce 2(n-1)/n; all_gather and reduce_scatter (n-1)/n
with size = total bytes; broadcast and sendrecv 1.
"""
from __future__ import annotations

import re
import time

import numpy as np

from ringpipe.runtime.files import check_writable_file, write_json
from ringpipe.tools import bench_libraries
from ringpipe.tools.bench_rounds import interleaved_rounds, median_of_rounds

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "sendrecv")
DTYPE = "float32"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {text!r}; use e.g. 1K, 64M, 4096")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]


def parse_sizes(text: str, factor: int = 4) -> list[int]:
    """'1K-64M' (every factor-th power from 1K to 64M) or a comma list '1K,1M'."""
    if "-" in text:
        low, high = (parse_size(t) for t in text.split("-", 1))
        if low <= 0 or high < low:
            raise ValueError(f"bad size range {text!r}")
        sizes, size = [], low
        while size <= high:
            sizes.append(size)
            size *= factor
        return sizes
    return [parse_size(t) for t in text.split(",") if t.strip()]


def bus_factor(op: str, n: int) -> float:
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}.get(op, 1.0)


# Untimed calls of each op and size before the timed ones (nccl-tests' warm-up iterations): past the
# first 10 calls of a size, ringpipe's channels store as their probes found faster (runtime/stream_choice.py).
WARMUP_CALLS = 10


def iterations(size: int) -> int:
    # Enough repetitions for a stable mean, bounded so the largest sizes stay quick.
    return int(min(200, max(5, (256 << 20) // max(size, 1) // 16)))


# ---- one library-neutral measurement loop (runs on every rank) --------------------------------------
def measure(ops, op_names, sizes, iters=None) -> list[dict]:
    """One round on one rank (`ops`: a bench_libraries.Ops): per op and size, a checked call,
    WARMUP_CALLS untimed ones, then `iters` (default `iterations(size)`) timed calls after a barrier;
    rows with this rank's mean time in seconds."""
    n, rank = ops.size, ops.rank
    rows = []
    for op in op_names:
        for size in sizes:
            count = max(1, size // 4)
            if op in ("all_gather", "reduce_scatter"):
                count = max(n, count - count % n)
            run, check = _prepare(ops, op, count, n, rank)
            wrong = check(run())
            run_timed, _ = _prepare(ops, op, count, n, rank, timed=True)
            calls = iters or iterations(size)
            for _ in range(WARMUP_CALLS):
                run_timed()
            ops.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                run_timed()
            elapsed = (time.perf_counter() - start) / calls
            rows.append({"op": op, "size_bytes": count * 4, "count": count, "dtype": DTYPE, "time": elapsed,
                         "wrong": int(wrong)})
    return rows


def _prepare(ops, op, count, n, rank, timed=False):
    """(run, check) for one op: run() performs it once; check(result) counts wrong elements."""
    fill = 0.0 if timed else float(rank + 1)
    if op == "all_reduce":
        x = ops.array(np.full(count, fill, np.float32))
        return (lambda: ops.all_reduce(x)), (lambda r: np.count_nonzero(np.asarray(r) != n * (n + 1) / 2))
    if op == "all_gather":
        x = ops.array(np.full(count // n, fill, np.float32))
        expected = np.repeat(np.arange(1, n + 1, dtype=np.float32), count // n)
        return (lambda: ops.all_gather(x)), (lambda r: np.count_nonzero(np.asarray(r) != expected))
    if op == "reduce_scatter":
        x = ops.array(np.full(count, fill, np.float32))
        return (lambda: ops.reduce_scatter(x)), (lambda r: np.count_nonzero(np.asarray(r) != n * (n + 1) / 2))
    if op == "broadcast":
        x = ops.array(np.full(count, fill, np.float32))
        return (lambda: ops.broadcast(x)), (lambda r: np.count_nonzero(np.asarray(r) != 1.0))
    if op == "sendrecv":
        x = ops.array(np.full(count, fill, np.float32))
        out = ops.array(np.empty(count, np.float32))
        expected = float((rank - 1) % n + 1)
        return (lambda: ops.sendrecv(x, out)), (lambda r: np.count_nonzero(np.asarray(r) != expected))
    raise ValueError(f"unknown op {op!r}")


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One round's rows from every rank's: the slowest rank's time (in µs), #wrong summed."""
    rows = []
    for parts in zip(*per_rank):
        first = parts[0]
        rows.append({"op": first["op"], "size_bytes": first["size_bytes"], "count": first["count"],
                     "dtype": first["dtype"], "time_us": max(p["time"] for p in parts) * 1e6,
                     "wrong": sum(p["wrong"] for p in parts)})
    return rows


def with_bandwidth(row: dict, world_size: int) -> dict:
    """`row` with algbw and busbw (GB/s) from its time_us."""
    algbw = row["size_bytes"] / (row["time_us"] * 1e-6) / 1e9
    return dict(row, algbw=algbw, busbw=algbw * bus_factor(row["op"], world_size))


def run(world_size=4, ops=OPS, sizes=(1 << 10,), compare=(), rounds=5, algorithm="auto", iters=None,
        progress=None) -> dict:
    """ringpipe and the `compare` libraries (bench_libraries.PEERS), each once per round, interleaved.

    Returns {"world_size", "rounds", "libraries", "unavailable": {library: why}, "rows": [...]}, one
    row per library, op and size: the median of the rounds (time_us, algbw, busbw in GB/s), #wrong
    summed over them, and "rounds" with every round's time_us and #wrong."""
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    libraries = ["ringpipe", *compare]
    if iters is not None and iters < 1:
        raise ValueError(f"--iters must be at least 1, got {iters}")
    args = {"op_names": ops, "sizes": list(sizes), "iters": iters}
    runners = {library: (lambda library=library: merge_ranks(
        bench_libraries.run(library, world_size, "ringpipe.tools.bench_collectives:measure", args, algorithm)))
        for library in libraries}
    results, unavailable = interleaved_rounds(runners, rounds, progress)
    rows = [dict(with_bandwidth(row, world_size), impl=library)
            for library, per_round in results.items()
            for row in median_of_rounds(per_round, ("op", "size_bytes"))]
    return {"benchmark": "collectives", "world_size": world_size, "rounds": rounds, "libraries": libraries,
            "unavailable": unavailable, "rows": rows}


def format_table(result: dict) -> str:
    """nccl-tests columns for ringpipe (medians), then each peer's time, busbw, #wrong and speedup."""
    n, rounds = result["world_size"], result["rounds"]
    peers = [p for p in result["libraries"][1:] if p not in result["unavailable"]]
    by_key = {(r["impl"], r["op"], r["size_bytes"]): r for r in result["rows"]}
    lines = [f"# ringpipe collectives, {n} ranks, bandwidth in GB/s; each figure the median of {rounds} "
             f"interleaved round{'s' if rounds != 1 else ''}"]
    if peers:
        lines.append("# vs X: X's time / ringpipe's (above 1: ringpipe is faster)")
    lines += [f"# {library}: not run: {why}" for library, why in result["unavailable"].items()]
    head = f"{'op':>15} {'size(B)':>11} {'count':>10} {'dtype':>8} {'time(us)':>11} {'algbw':>8} {'busbw':>8} {'#wrong':>7}"
    for peer in peers:
        head += f" {peer + '(us)':>11} {peer + ' bus':>9} {peer + ' #wrong':>11} {'vs ' + peer:>8}"
    lines.append(head)
    for row in (r for r in result["rows"] if r["impl"] == "ringpipe"):
        line = (f"{row['op']:>15} {row['size_bytes']:>11} {row['count']:>10} {row['dtype']:>8} "
                f"{row['time_us']:>11.1f} {row['algbw']:>8.3f} {row['busbw']:>8.3f} {row['wrong']:>7}")
        for peer in peers:
            other = by_key[peer, row["op"], row["size_bytes"]]
            line += (f" {other['time_us']:>11.1f} {other['busbw']:>9.3f} {other['wrong']:>11}"
                     f" {speedup(other['time_us'], row['time_us']):>8}")
        lines.append(line)
    return "\n".join(lines)


def speedup(peer_us: float, ringpipe_us: float) -> str:
    """The peer's time over ringpipe's, to three significant digits ("0.0123x", "2.51x")."""
    return f"{peer_us / ringpipe_us:.3g}x"


def parse_compare(text: str) -> list[str]:
    """'none', or a comma list of peer libraries ('gloo,mpi'), or ringpipe@PATH: another checkout."""
    names = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    for index, name in enumerate(names):
        if name.startswith(bench_libraries.CHECKOUT):  # another checkout of ringpipe: A/B in one run
            names[index] = bench_libraries.CHECKOUT + bench_libraries.check_checkout(name[len(bench_libraries.CHECKOUT):])
        elif name not in bench_libraries.PEERS:
            raise ValueError(f"--compare: unknown library {name!r}; choose from none, {', '.join(bench_libraries.PEERS)}, "
                             f"{bench_libraries.CHECKOUT}PATH")
    return list(dict.fromkeys(names))


def main(world_size=4, ops=OPS, sizes="1K-64M", compare=(), json_path=None, algorithm="auto", rounds=5,
         iters=None, echo=print, progress=None) -> dict:
    size_list = parse_sizes(sizes) if isinstance(sizes, str) else list(sizes)
    compare = parse_compare(compare) if isinstance(compare, str) else list(compare or ())
    if json_path:
        check_writable_file(json_path)  # before the run, whose results would be lost at the end
    result = run(world_size, ops, size_list, compare, rounds, algorithm, iters, progress)
    echo(format_table(result))
    if json_path:
        write_json(json_path, result, indent=1)
    return result

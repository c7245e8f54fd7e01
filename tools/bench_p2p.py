"""Point-to-point latency between two ranks on one host: ping-pong, ringpipe next to OpenMPI (mpi4py)
and torch.distributed's gloo in the same run.

Per size, rank 0 sends a float32 buffer to rank 1, which sends it back; the first exchange is
checked element by element (#wrong), then `round_trips(size)` round trips are timed one by one on
rank 0. A round's one-way latency is half the median round trip; the reported figure is the median
of the rounds, interleaved ringpipe, peer, ringpipe, peer, ... (bench_rounds), every round kept.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from ringpipe.runtime.files import check_writable_file, write_json
from ringpipe.tools import bench_libraries
from ringpipe.tools.bench_collectives import parse_compare, parse_sizes, speedup
from ringpipe.tools.bench_rounds import interleaved_rounds, median_of_rounds

WORLD_SIZE = 2
BYTES_PER_SIZE = 64 << 20  # large sizes: fewer round trips, each moving 2× size bytes


def round_trips(size: int, pingpongs: int) -> int:
    """`pingpongs` round trips for the small sizes; above 64 KiB fewer (at least 10), so that every
    size moves about the same bytes."""
    return min(pingpongs, max(10, BYTES_PER_SIZE // max(size, 1)))


def measure(ops, sizes, pingpongs) -> list[dict]:
    """One round on one rank (`ops`: a bench_libraries.Ops; ranks 0 and 1 play, others wait at the
    barriers): rows with the median round trip in µs (rank 0's; None elsewhere) and #wrong."""
    rank = ops.rank
    rows = []
    for size in sizes:
        count = max(1, size // 4)
        trips = round_trips(count * 4, pingpongs)
        mine = ops.array(np.full(count, rank + 1.0, np.float32))
        received = ops.array(np.empty(count, np.float32))
        ops.barrier()
        wrong = 0
        if rank == 0:  # the checked exchange, which also warms the path up
            ops.send(mine, 1)
            wrong = np.count_nonzero(np.asarray(ops.recv(received, 1)) != 2.0)
        elif rank == 1:
            wrong = np.count_nonzero(np.asarray(ops.recv(received, 0)) != 1.0)
            ops.send(mine, 0)
        ops.barrier()
        times = []
        if rank == 0:
            for _ in range(trips):
                start = time.perf_counter()
                ops.send(mine, 1)
                ops.recv(received, 1)
                times.append(time.perf_counter() - start)
        elif rank == 1:
            for _ in range(trips):
                ops.send(ops.recv(received, 0), 0)
        rows.append({"size_bytes": count * 4, "count": count, "dtype": "float32", "pingpongs": trips,
                     "round_trip_us": statistics.median(times) * 1e6 if times else None, "wrong": int(wrong)})
    return rows


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One round's rows: rank 0's round trip, time_us = half of it (one way), #wrong summed."""
    rows = []
    for parts in zip(*per_rank):
        row = dict(parts[0], wrong=sum(p["wrong"] for p in parts))
        row["time_us"] = row["round_trip_us"] / 2
        rows.append(row)
    return rows


def run(sizes=(1 << 10,), pingpongs=1000, compare=(), rounds=5, progress=None) -> dict:
    """ringpipe and the `compare` libraries (bench_libraries.PEERS), each once per round, interleaved.

    Returns {"world_size", "rounds", "libraries", "unavailable": {library: why}, "rows": [...]}, one
    row per library and size: time_us = the median over rounds of the one-way latency, GB/s =
    size / time_us, #wrong summed, and "rounds" with every round's time_us and #wrong."""
    if pingpongs < 1:
        raise ValueError(f"--pingpongs must be at least 1, got {pingpongs}")
    libraries = ["ringpipe", *compare]
    args = {"sizes": list(sizes), "pingpongs": pingpongs}
    runners = {library: (lambda library=library: merge_ranks(
        bench_libraries.run(library, WORLD_SIZE, "ringpipe.tools.bench_p2p:measure", args)))
        for library in libraries}
    results, unavailable = interleaved_rounds(runners, rounds, progress)
    rows = []
    for library, per_round in results.items():
        for row in median_of_rounds(per_round, ("size_bytes",)):
            row.pop("round_trip_us")  # one round's; the median is 2 × time_us
            rows.append(dict(row, gbps=row["size_bytes"] / (row["time_us"] * 1e-6) / 1e9, impl=library))
    return {"benchmark": "p2p", "world_size": WORLD_SIZE, "rounds": rounds, "libraries": libraries,
            "unavailable": unavailable, "rows": rows}


def format_table(result: dict) -> str:
    """One line per size: ringpipe's one-way latency (median), then each peer's and the speedup."""
    rounds = result["rounds"]
    peers = [p for p in result["libraries"][1:] if p not in result["unavailable"]]
    by_key = {(r["impl"], r["size_bytes"]): r for r in result["rows"]}
    lines = [f"# ringpipe p2p one-way latency, 2 ranks on one host: half the median round trip of the "
             f"ping-pongs; each figure the median of {rounds} interleaved round{'s' if rounds != 1 else ''}"]
    if peers:
        lines.append("# vs X: X's time / ringpipe's (above 1: ringpipe is faster)")
    lines += [f"# {library}: not run: {why}" for library, why in result["unavailable"].items()]
    head = f"{'size(B)':>11} {'count':>10} {'pingpongs':>9} {'one-way(us)':>11} {'GB/s':>8} {'#wrong':>7}"
    for peer in peers:
        head += f" {peer + '(us)':>11} {peer + ' GB/s':>9} {peer + ' #wrong':>11} {'vs ' + peer:>8}"
    lines.append(head)
    for row in (r for r in result["rows"] if r["impl"] == "ringpipe"):
        line = (f"{row['size_bytes']:>11} {row['count']:>10} {row['pingpongs']:>9} {row['time_us']:>11.1f} "
                f"{row['gbps']:>8.3f} {row['wrong']:>7}")
        for peer in peers:
            other = by_key[peer, row["size_bytes"]]
            line += (f" {other['time_us']:>11.1f} {other['gbps']:>9.3f} {other['wrong']:>11}"
                     f" {speedup(other['time_us'], row['time_us']):>8}")
        lines.append(line)
    return "\n".join(lines)


def main(sizes="1K-4M", pingpongs=1000, compare=(), rounds=5, json_path=None, echo=print, progress=None) -> dict:
    size_list = parse_sizes(sizes) if isinstance(sizes, str) else list(sizes)
    compare = parse_compare(compare) if isinstance(compare, str) else list(compare or ())
    if json_path:
        check_writable_file(json_path)  # before the run, whose results would be lost at the end
    result = run(size_list, pingpongs, compare, rounds, progress)
    echo(format_table(result))
    if json_path:
        write_json(json_path, result, indent=1)
    return result

"""Thread CPU and wall time per collective at the sizes of the one-call rounds (runtime/shm_small.py),
this tree against a baseline checkout, in interleaved rounds: CPU stays readable on a loaded machine.

    python -m ringpipe.tools.bench_collective_cpu --baseline DIR [--op all_reduce] [--sizes 64K,256K,1M]
        [--ranks 2,4] [--rounds 3] [--ops 2000]

Per size, rank count and round, this tree then the baseline run in fresh processes: each rank
times `--ops` float32 operations `--op` (all_reduce, broadcast from rank 0, all_gather,
reduce_scatter; the size is the array each rank passes) after 200 unmeasured ones; a round's figures are the mean over
ranks of thread CPU per operation and rank 0's mean wall time per operation. Each figure printed is
the median of the rounds.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter")


def rank_part(comm, op: str, nbytes: int, count: int) -> tuple[float, float]:
    """(thread CPU µs, wall µs) per operation `op` on `nbytes` on this rank."""
    x = np.zeros(nbytes // 4 // comm.size * comm.size if op == "reduce_scatter" else nbytes // 4, np.float32)
    run = {"all_reduce": lambda: comm.all_reduce(x), "broadcast": lambda: comm.broadcast(x, 0),
           "all_gather": lambda: comm.all_gather(x), "reduce_scatter": lambda: comm.reduce_scatter(x)}[op]
    for _ in range(200):  # the channel opened, the spin settled
        run()
    comm.barrier()
    start_cpu, start = time.thread_time_ns(), time.perf_counter_ns()
    for _ in range(count):
        run()
    return (time.thread_time_ns() - start_cpu) / count / 1e3, (time.perf_counter_ns() - start) / count / 1e3


def _child(op: str, world_size: int, nbytes: int, count: int):
    from ringpipe.runtime import Cluster

    with Cluster(world_size, threads_per_worker=1) as cluster:
        per_rank = cluster.run(rank_part, op, nbytes, count)
    print(json.dumps({"cpu_us": statistics.mean(cpu for cpu, _ in per_rank), "wall_us": per_rank[0][1]}))


def _measure(checkout: str, op: str, world_size: int, nbytes: int, count: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(checkout, os.path.join(tmp, "ringpipe"))
        result = subprocess.run([sys.executable, str(HERE), "--child", op, str(world_size), str(nbytes), str(count)],
                                env=dict(os.environ, PYTHONPATH=tmp), capture_output=True, text=True, timeout=600)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench_collective_cpu: {op} of {nbytes} B on {world_size} ranks of {checkout} "
                           f"failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(baseline: str, op: str, sizes, ranks, rounds: int, count: int, progress=print) -> list[dict]:
    """Rows {"bytes", "ranks", "variant", "cpu_us", "wall_us", "rounds"} (medians; every round kept)."""
    variants = {"this tree": str(HERE.parent.parent), "baseline": baseline}
    rows = []
    for nbytes in sizes:
        for world_size in ranks:
            measured = {name: [] for name in variants}
            for index in range(rounds):
                for name, checkout in variants.items():
                    measured[name].append(_measure(checkout, op, world_size, nbytes, count))
                progress(f"{nbytes} B on {world_size} ranks: round {index + 1}/{rounds}, "
                         f"load {os.getloadavg()[0]:.1f}")
            for name, runs in measured.items():
                rows.append({"bytes": nbytes, "ranks": world_size, "variant": name, "rounds": runs,
                             "cpu_us": statistics.median(r["cpu_us"] for r in runs),
                             "wall_us": statistics.median(r["wall_us"] for r in runs)})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    from ringpipe.tools.bench_libraries import check_checkout
    from ringpipe.tools.script_args import ScriptParser, at_least, checked

    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=checked(check_checkout), required=True,
                        help="a checkout of the commit to compare with")
    parser.add_argument("--op", choices=OPS, default="all_reduce")
    parser.add_argument("--sizes", default="64K,256K,1M", help="all_reduce sizes, comma-separated (K, M suffixes)")
    parser.add_argument("--ranks", default="2,4", help="rank counts, comma-separated")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--ops", type=at_least(1), default=2000, help="operations timed per case and round")
    args = parser.parse_args(argv)
    units = {"K": 1 << 10, "M": 1 << 20}
    try:
        sizes = [int(s[:-1]) * units[s[-1]] if s[-1:] in units else int(s) for s in args.sizes.split(",")]
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r} / --ranks {args.ranks!r}: expected comma-separated integers")
    if any(s < 4 for s in sizes) or any(r < 2 for r in ranks):
        parser.error(f"--sizes {args.sizes!r} / --ranks {args.ranks!r}: sizes of at least 4 bytes, 2 ranks or more")
    rows = run(args.baseline, args.op, sizes, ranks, args.rounds, args.ops)
    print(f"# float32 {args.op}, medians of {args.rounds} interleaved rounds; load now {os.getloadavg()[0]:.1f}")
    print(f"{'bytes':>9} {'ranks':>5} {'variant':>10} {'CPU us/op':>10} {'wall us/op':>11}")
    for row in rows:
        print(f"{row['bytes']:>9} {row['ranks']:>5} {row['variant']:>10} {row['cpu_us']:>10.1f} "
              f"{row['wall_us']:>11.1f}")


if __name__ == "__main__":
    main()

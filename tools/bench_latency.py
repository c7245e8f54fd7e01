"""Small-message cost on one host: wall time and CPU time per 1 KiB operation, which stays readable
on a loaded machine (where every wait is a trip through the scheduler and wall times say little).

    python -m ringpipe.tools.bench_latency [--rounds 3] [--ops 2000] [--baseline DIR] [--python-rounds]

Per case (2-rank all_reduce, 2-rank ping-pong, 4-rank all_reduce), fresh ranks time `--ops`
operations one by one: the median wall time per operation (rank 0's; half a round trip for the
ping-pong) and the mean over ranks of their thread CPU time per operation (per send + receive for
the ping-pong). Each figure is the median of `--rounds` interleaved rounds (tools/bench_rounds.py):
this tree, then `ringpipe@DIR` (`--baseline`), then this tree with `RINGPIPE_SHM_SMALL=0` (the
Python rounds, `--python-rounds`).
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

CASES = (("all_reduce", 2), ("ping-pong", 2), ("all_reduce", 4))
HERE = Path(__file__).resolve()


def rank_part(comm, case: str, count: int) -> dict:
    """One rank's part of one case: {"wall_us", "cpu_us"} (wall: median per operation)."""
    x, received = np.zeros(256, np.float32), np.empty(256, np.float32)
    for _ in range(100):  # the channel opened, the spin settled
        comm.all_reduce(x)
    comm.barrier()
    times, start_cpu = [], time.thread_time_ns()
    for _ in range(count):
        start = time.perf_counter_ns()
        if case == "all_reduce":
            comm.all_reduce(x)
        elif comm.rank == 0:
            comm.send(x, 1)
            comm.recv(1, out=received)
        elif comm.rank == 1:
            comm.send(comm.recv(0, out=received), 0)
        times.append(time.perf_counter_ns() - start)
    wall = statistics.median(times) / 1e3 / (2 if case == "ping-pong" else 1)
    return {"wall_us": wall, "cpu_us": (time.thread_time_ns() - start_cpu) / count / 1e3}


def _child(case: str, world_size: int, count: int):
    """In a fresh process importing the checkout under test: one case, its result on stdout."""
    from ringpipe.runtime import Cluster

    with Cluster(world_size, threads_per_worker=1) as cluster:
        per_rank = cluster.run(rank_part, case, count)
    cpu = [r["cpu_us"] for rank, r in enumerate(per_rank) if case != "ping-pong" or rank < 2]
    print(json.dumps({"wall_us": per_rank[0]["wall_us"], "cpu_us": statistics.mean(cpu)}))


def _measure(checkout: str, env: dict, case: str, world_size: int, count: int) -> tuple[float, float]:
    """(wall, CPU) µs per operation of `checkout` (a folder with runtime/), in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(checkout, os.path.join(tmp, "ringpipe"))
        result = subprocess.run([sys.executable, str(HERE), "--child", case, str(world_size), str(count)],
                                env=dict(os.environ, PYTHONPATH=tmp, **env), capture_output=True, text=True,
                                timeout=600)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench_latency: {case} on {world_size} ranks of {checkout} failed: {last}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return row["wall_us"], row["cpu_us"]


def run(rounds: int = 3, count: int = 2000, baseline: str | None = None, python_rounds: bool = False,
        progress=print) -> list[dict]:
    """Rows {"case", "ranks", "variant", "wall_us", "cpu_us", "rounds": [(wall, cpu), ...]}: per
    case, each variant once per round, in turn."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    variants = {"this tree": (str(HERE.parent.parent), {})}
    if baseline:
        if not os.path.isfile(os.path.join(baseline, "runtime", "__init__.py")):
            raise ValueError(f"--baseline {baseline}: not a ringpipe checkout (no runtime/__init__.py there)")
        variants["baseline"] = (os.path.abspath(baseline), {})
    if python_rounds:
        # (and point-to-point on its Python path too: the fast path's baseline in the same tree)
        variants["python rounds"] = (str(HERE.parent.parent), {"RINGPIPE_SHM_SMALL": "0", "RINGPIPE_SHM_P2P_C": "0"})
    rows = []
    for case, world_size in CASES:
        measured = {name: [] for name in variants}
        for index in range(rounds):
            for name, (checkout, env) in variants.items():
                measured[name].append(_measure(checkout, env, case, world_size, count))
            progress(f"{case} on {world_size} ranks: round {index + 1}/{rounds}, load {os.getloadavg()[0]:.1f}")
        for name, pairs in measured.items():
            rows.append({"case": case, "ranks": world_size, "variant": name, "rounds": pairs,
                         "wall_us": statistics.median(w for w, _ in pairs),
                         "cpu_us": statistics.median(c for _, c in pairs)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"# 1 KiB float32, medians of interleaved rounds; load average now {os.getloadavg()[0]:.1f}",
             f"{'case':>12} {'ranks':>5} {'variant':>14} {'wall us/op':>11} {'CPU us/op':>10}"]
    for row in rows:
        lines.append(f"{row['case']:>12} {row['ranks']:>5} {row['variant']:>14} {row['wall_us']:>11.1f} "
                     f"{row['cpu_us']:>10.1f}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1], int(argv[2]), int(argv[3]))
    from ringpipe.tools.bench_libraries import check_checkout  # (a child may run in a baseline's tree)
    from ringpipe.tools.script_args import ScriptParser, at_least, checked

    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--ops", type=at_least(1), default=2000, help="operations timed per case and round")
    parser.add_argument("--baseline", type=checked(check_checkout),
                        help="a checkout of the commit to compare with")
    parser.add_argument("--python-rounds", action="store_true", help="also this tree with RINGPIPE_SHM_SMALL=0")
    args = parser.parse_args(argv)
    print(format_table(run(args.rounds, args.ops, args.baseline, args.python_rounds)))


if __name__ == "__main__":
    main()

"""Tracing overhead: step time of a 2-rank loop with tracing off vs on, and the cost of each hook.

A step is what a small pipeline/data-parallel step does: `matmuls` matmuls of size x size inside
forward/backward spans, a send/recv pair between the ranks and an all_reduce of the result. Rounds
alternate off/on so machine noise hits both alike; each round's time is the slower rank's mean
step time; the overhead is the median over pairs of (traced round / untraced round before it) - 1.
On a shared machine that is noisy, so the modelled overhead (events per step x each hook's cost)
is reported too. The hook micro-benchmark times each Tracer call in a tight loop in this
process (enabled vs disabled).

    python -m ringpipe.tools.bench_trace [--steps 20] [--rounds 15] [--size 192] [--json]
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time

import numpy as np

from ringpipe.tools.script_args import ScriptParser, at_least


def traced_steps(comm, steps: int, size: int, matmuls: int):
    """Run `steps` training-like steps; returns (mean step seconds, trace events recorded)."""
    rng = np.random.default_rng(comm.rank)
    a = rng.standard_normal((size, size), dtype=np.float32)
    peer = 1 - comm.rank
    comm.barrier()
    start = time.perf_counter()
    for step in range(steps):
        with comm.tracer.span("forward", microbatch=0, stage=comm.rank, step=step):
            for _ in range(matmuls // 2):
                b = a @ a
        if comm.rank == 0:
            comm.send(b[:64], peer, tag=1)
        else:
            comm.recv(peer, tag=1)
        with comm.tracer.span("backward", microbatch=0, stage=comm.rank, step=step):
            for _ in range(matmuls - matmuls // 2):
                b = a @ a
        comm.all_reduce(b)
        comm.tracer.counter("step", step)
    elapsed = time.perf_counter() - start
    return elapsed / steps, len(comm.tracer.events)


def hook_costs(iterations: int = 20000) -> dict:
    """Microseconds per call of each Tracer hook, disabled and enabled."""
    from ringpipe.runtime.trace import Tracer, now_ns

    tracer = Tracer(0)
    costs = {}
    for enabled in (False, True):
        tracer.start() if enabled else None
        tracer.enabled = enabled
        label = "on" if enabled else "off"
        start = time.perf_counter()
        for _ in range(iterations):
            with tracer.span("forward", microbatch=0, stage=0, step=0):
                pass
        costs[f"span_{label}_us"] = (time.perf_counter() - start) / iterations * 1e6
        start = time.perf_counter()
        for i in range(iterations):
            tracer.counter("comm ops in flight", i, thread="comm")
        costs[f"counter_{label}_us"] = (time.perf_counter() - start) / iterations * 1e6
        start = time.perf_counter()
        for i in range(iterations):
            tracer.complete("send", "comm", "comm", now_ns(), now_ns(), {"bytes": 8, "flow": "x"})
        costs[f"complete_{label}_us"] = (time.perf_counter() - start) / iterations * 1e6
        tracer.events = []
    start = time.perf_counter()
    for i in range(iterations):
        tracer.next_flow((0, 0, 1, i % 8))
    costs["next_flow_us"] = (time.perf_counter() - start) / iterations * 1e6
    return {k: round(v, 3) for k, v in costs.items()}


def run(steps: int = 20, rounds: int = 15, size: int = 192, matmuls: int = 4) -> dict:
    from ringpipe.runtime.cluster import Cluster

    off, on, kinds = [], [], {}
    with Cluster(2) as cluster, tempfile.TemporaryDirectory() as directory:
        cluster.run(traced_steps, 5, size, matmuls)  # warm up: imports, buffers, shm mappings
        for _ in range(rounds):
            off.append(max(t for t, _ in cluster.run(traced_steps, steps, size, matmuls)))
            cluster.start_trace()
            results = cluster.run(traced_steps, steps, size, matmuls)
            paths = cluster.stop_trace(directory)
            on.append(max(t for t, _ in results))
        for path in paths:  # what one step records, per rank: spans, comm operations, counter samples
            with open(path) as f:
                for phase, _, category, *_ in json.load(f)["events"]:
                    kind = "counters" if phase == "C" else "comm_ops" if category == "comm" else "spans"
                    kinds[kind] = kinds.get(kind, 0) + 1 / (steps * len(paths))
    # Paired rounds: machine load shared with other processes drifts slowly, so compare each
    # traced round with the untraced round just before it.
    ratios = [b / a for a, b in zip(off, on)]
    hooks = hook_costs()
    per_step_us = (kinds.get("spans", 0) * (hooks["span_on_us"] - hooks["span_off_us"])
                   + kinds.get("comm_ops", 0) * (hooks["next_flow_us"] + hooks["complete_on_us"])
                   + kinds.get("counters", 0) * hooks["counter_on_us"])
    step_off = statistics.median(off)
    return {
        "steps": steps, "rounds": rounds, "size": size, "matmuls": matmuls,
        "step_ms_off": round(step_off * 1e3, 4), "step_ms_on": round(statistics.median(on) * 1e3, 4),
        "overhead_pct": round(100.0 * (statistics.median(ratios) - 1), 2),
        "overhead_pct_min_rounds": round(100.0 * (min(on) / min(off) - 1), 2),
        "modelled_overhead_pct": round(100.0 * per_step_us / (step_off * 1e6), 3),
        "events_per_step": {k: round(v, 2) for k, v in kinds.items()},
        "rounds_ms_off": [round(t * 1e3, 4) for t in off], "rounds_ms_on": [round(t * 1e3, 4) for t in on],
        "hooks_us": hooks,
    }


def format_result(r: dict) -> str:
    hooks = ", ".join(f"{k} {v}" for k, v in r["hooks_us"].items())
    return (f"step {r['step_ms_off']:.3f} ms tracing off, {r['step_ms_on']:.3f} ms on ({r['rounds']} paired rounds "
            f"x {r['steps']} steps, {r['matmuls']} matmuls of {r['size']}^2)\n"
            f"overhead: {r['overhead_pct']:+.2f}% median of paired rounds, {r['overhead_pct_min_rounds']:+.2f}% "
            f"fastest rounds, {r['modelled_overhead_pct']:.3f}% modelled (events/step x hook cost)\n"
            f"events/step per rank: {r['events_per_step']}\nhook cost (us/call): {hooks}")


def main(argv=None):
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--rounds", type=at_least(1), default=15)
    parser.add_argument("--size", type=at_least(1), default=192)
    parser.add_argument("--matmuls", type=at_least(1), default=4)
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    args = parser.parse_args(argv)
    result = run(args.steps, args.rounds, args.size, args.matmuls)
    print(json.dumps(result, indent=1) if args.json else format_result(result))


if __name__ == "__main__":
    main()

"""Measured pipeline bubble: per-stage busy and idle time of real runs, next to the schedules' theory.

For every (schedule, micro-batch count) a fresh local cluster runs `ParallelTrainer` with dp = tp = 1,
pp stages, one BLAS thread per worker. After `warmup` steps the runtime's tracer records `steps`
steps; everything below comes from those spans, and each number is the median over the traced steps.

    ringpipe bench pipeline                       # 1f1b, zb-h1, gpipe, interleaved (v=2) × m = 4, 8
    ringpipe bench pipeline --schedules 1f1b --microbatches 8 --steps 10 --json pipeline.json

Numbers are only meaningful on a quiet machine (`uptime` load well under the core count): another
job stretching single actions moves the per-step bubble by several points (the printed step range
shows how much), and 1F1B, whose ranks wait on each other every action, feels it most. So with
`rounds` > 1 every setup runs once per round, the setups taking turns (a burst of outside load hits
them alike), and each reports its best round (lowest bubble), as the data-parallel bench reports
its best round; every round's result is printed and kept in the row.

What is measured (per step, per pipeline rank)
  window    ONE window per step, shared by all ranks: from the first pipeline compute span (forward,
            backward, backward_input, backward_weight) of that step on ANY rank to the last one on
            any rank. The optimizer (gradient sync, clipping, AdamW) is outside the pipeline's theory
            and is reported apart. A shared window is what the theory assumes: the last rank idling
            until the first activation arrives is bubble.
  compute   union of the rank's pipeline compute spans of that step inside the window.
  transfer  comm-thread time actually moving bytes (a comm span minus its leading `wait_us`), not
            overlapped by compute ("exposed comm"). It is not bubble.
  bubble    window − compute − exposed transfer: the rank neither computes nor moves bytes. Time
            BLOCKED WAITING ON A PEER (a receive whose message has not come, an all-reduce whose
            peer is late) IS bubble; so is any other gap ("overhead": Python between actions,
            handing work to the comm thread, the previous step's optimizer tail).
  bubble fraction (of total)  Σ_ranks bubble / (p · window)      — comparable across schedules.
  bubble ratio (to ideal)     Σ_ranks bubble / Σ_ranks compute   — the Megatron / zero-bubble form.

Theory, given in both forms (r = ratio to ideal compute, f = fraction of total, f = r / (1 + r)):
  gpipe, 1f1b   f = (p−1)/(m+p−1)     (so r = (p−1)/m)
  interleaved   r = (1/v)·(p−1)/m     (Narayanan et al.; converted to f for the comparison)
  zb-h1         f from `simulate` with unit costs F = B = W (textbook r = (p−1)/(3m) is printed too)
Also `simulate` of the same schedule (a) with the median MEASURED cost of each (rank, stage, kind) and
the measured p2p latency: what the schedule should reach here with steady costs and no executor
overhead; (b) "replay": each traced step with its own span durations and the measured latency. So
  simulated(a) − theory     stage imbalance and the real F:B:W cost ratios,
  replay − simulated(a)     jitter (one slow action delays the peer; CPU shared with other jobs),
  measured − replay         executor overhead: Python between actions, thread hand-offs, latency spread.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

from ringpipe.model.parallel.pipeline_parallel.schedules import Kind, build_schedule, split_layers
from ringpipe.model.parallel.pipeline_parallel.simulator import UNIT_COSTS, simulate, theoretical_bubble
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import TOKEN_FILE
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime import Cluster
from ringpipe.runtime.files import write_text
from ringpipe.tools.bench_data_parallel import CORPUS
from ringpipe.tools.trace_io import COMPUTE_THREAD, load_trace
from ringpipe.tools.trace_summary import intersect, rank_intervals, subtract, total, union

SCHEDULES = ("1f1b", "zb-h1", "gpipe", "interleaved")
SPAN_OF_KIND = {Kind.FORWARD: "forward", Kind.BACKWARD: "backward", Kind.BACKWARD_INPUT: "backward_input",
                Kind.BACKWARD_WEIGHT: "backward_weight"}
PIPELINE_SPANS = frozenset(SPAN_OF_KIND.values())
DEFINITIONS = {
    "window": "per step, shared by all ranks: first to last pipeline compute span (F/B/I/W) of any rank",
    "compute": "union of the rank's pipeline compute spans in the window (optimizer excluded)",
    "exposed_comm": "comm spans minus their leading wait_us (bytes moving), not overlapped by compute",
    "bubble": "window - compute - exposed_comm; includes time blocked on a peer and any other gap",
    "blocked": "part of the bubble spent inside a comm span waiting on a peer",
    "overhead": "rest of the bubble: Python between actions, thread hand-offs, previous optimizer tail",
    "bubble_fraction": "sum of bubbles / (p * window): fraction of total time",
    "bubble_ratio": "sum of bubbles / sum of compute: relative to ideal compute time",
}


def theory(schedule: str, p: int, m: int, v: int) -> dict:
    """The schedule's theoretical bubble as fraction of total time and as ratio to ideal compute, plus
    `simulate` with unit costs (F = 1, B = 2 or B = W = 1) as a cross-check of the formula."""
    unit = simulate(build_schedule(schedule, p, m, v), UNIT_COSTS).bubble_fraction
    fraction = theoretical_bubble(schedule, p, m, v)  # of total time
    textbook_ratio = fraction / (1 - fraction)  # to ideal compute time, as the papers quote it
    if schedule == "zb-h1":
        return {"fraction": unit, "ratio": unit / (1 - unit), "source": "simulate, unit costs F=B=W",
                "textbook_ratio": textbook_ratio, "simulated_unit_fraction": unit}
    source = "(1/v)(p-1)/m of ideal" if schedule == "interleaved" else "(p-1)/(m+p-1) of total"
    return {"fraction": fraction, "ratio": textbook_ratio, "source": source, "textbook_ratio": textbook_ratio,
            "simulated_unit_fraction": unit}


def run(schedules=SCHEDULES, microbatches=(4, 8), pp: int = 2, virtual_stages: int = 2, n_layer: int = 4,
        n_head: int = 8, n_embd: int = 256, block_size: int = 128, microbatch_size: int = 4, warmup: int = 2,
        steps: int = 5, split=None, timeout: float = 300.0, echo=None, rounds: int = 1) -> list[dict]:
    """One row (a dict, see `measure`) per (schedule, m): the best of `rounds` rounds, each round's
    bubble listed under "rounds"; rows whose layout cannot work raise ValueError before any worker
    starts. `echo(text)` gets each round's result (one line) as soon as it is measured."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if split is not None and "split" not in {f.name for f in dataclasses.fields(Layout)}:
        raise ValueError("--split: model.training.parallel_trainer.Layout has no 'split' field, so ParallelTrainer always "
                         "splits layers evenly (it calls split_layers without an explicit split)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        write_text(corpus, CORPUS)
        base = TrainConfig(data=corpus, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                           batch_size=microbatch_size, steps=10 ** 6, warmup=10, dtype="float32")
        plans = []
        for schedule in schedules:
            for m in microbatches:
                v = virtual_stages if schedule == "interleaved" else 1
                config = dataclasses.replace(base, batch_size=microbatch_size * m, microbatches=m)
                layout = Layout(pp=pp, schedule=schedule, virtual_stages=v)
                if split is not None:
                    split_layers(n_layer, pp * v, split)  # raises on a split that does not fit
                    layout = dataclasses.replace(layout, split=list(split))
                layout.validate(config)
                plans.append((config, layout))
        driver = Trainer.create(base, os.path.join(tmp, "run"))  # writes the token file once
        token_file = os.path.join(tmp, "run", TOKEN_FILE)
        measured = [[] for _ in plans]
        for round_index in range(rounds):  # setups take turns, so outside load hits them alike
            for k, (config, layout) in enumerate(plans):
                row = measure(config, layout, token_file, driver.tokenizer.vocab_size, warmup, steps,
                              os.path.join(tmp, f"trace-{layout.schedule}-{config.microbatches}-{round_index}"),
                              timeout)
                row["model"] = {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
                                "vocab_size": driver.tokenizer.vocab_size, "microbatch_size": microbatch_size,
                                "dtype": "float32", "split": [len(r) for r in _split(n_layer, layout, split)]}
                measured[k].append(row)
                if echo:
                    echo(f"round {round_index + 1}/{rounds}  {layout.schedule:<11} m={config.microbatches:<2} "
                         f"bubble {row['bubble_fraction']:6.1%}  measured/theory {row['measured_over_theory']:.2f}"
                         f"  one core {row['core_gflops']:.0f} GFLOP/s")
        for runs in measured:
            best = min(runs, key=lambda r: r["bubble_fraction"])
            best["rounds"] = [{"bubble_fraction": r["bubble_fraction"],
                               "measured_over_theory": r["measured_over_theory"],
                               "bubble_over_no_comm_replay": r["bubble_over_no_comm_replay"],
                               "core_gflops": r["core_gflops"]} for r in runs]
            # Issue #15's figure is the median over the rounds, not the best round.
            best["bubble_over_no_comm_replay_median"] = statistics.median(
                r["bubble_over_no_comm_replay"] for r in runs)
            rows.append(best)
    return rows


def _split(n_layer, layout, split):
    return split_layers(n_layer, layout.pp * layout.virtual_stages, split)


def core_gflops(seconds: float = 0.3) -> float:
    """Single-thread float32 matmul speed of this machine right now: on a shared machine the same
    run's bubble moves with how busy the neighbours are, so each row records it."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.ones((256, 256), np.float32)
    with threadpool_limits(1):
        a @ a
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ a
            count += 1
    return 2 * 256 ** 3 * count / (time.perf_counter() - start) / 1e9


def measure(config: TrainConfig, layout: Layout, token_file: str, vocab_size: int, warmup: int, steps: int,
            trace_dir: str, timeout: float) -> dict:
    """Run warmup + traced steps on a fresh cluster and reduce the trace to one row."""
    gflops = core_gflops()
    with Cluster(layout.world_size, threads_per_worker=1, timeout=timeout) as cluster:
        trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                 token_file, vocab_size)
        for step in range(warmup):
            trainers.train_step(step).result()
        cluster.start_trace()
        step_seconds = []
        for step in range(warmup, warmup + steps):
            start = time.perf_counter()
            trainers.train_step(step).result()
            step_seconds.append(time.perf_counter() - start)
        cluster.stop_trace(trace_dir)
    trace = load_trace(trace_dir)
    p, m, v = layout.pp, config.microbatches, layout.virtual_stages
    actions = build_schedule(layout.schedule, p, m, v)
    row = analyse(trace, actions)
    row.update(schedule=layout.schedule, pp=p, microbatches=m, virtual_stages=v, warmup=warmup, steps=steps,
               driver_step_s=statistics.median(step_seconds), load_average=list(os.getloadavg()),
               core_gflops=gflops,
               theory=theory(layout.schedule, p, m, v), definitions=DEFINITIONS)
    costs = row["action_costs"]

    def median_cost(rank, action):
        return costs.get(f"{rank}/{action.stage}/{SPAN_OF_KIND.get(action.kind)}", {}).get("median_s", 0.0)

    simulated = simulate(actions, median_cost, latency=row["p2p_latency_s"])
    row["simulated_with_measured_costs"] = {"fraction": simulated.bubble_fraction,
                                            "makespan_s": simulated.makespan}
    row["measured_over_theory"] = row["bubble_fraction"] / row["theory"]["fraction"]
    return row


def analyse(trace, actions: list) -> dict:
    """Median per-step busy/bubble per rank, per-action costs and p2p latency from one trace of a run
    of `actions` (the schedule, one action list per rank). Each step is also replayed: `simulate` with
    that step's own span durations, so jitter is in it and only executor overhead and latency are not."""
    by_step: dict = {}
    for span in trace.spans(thread=COMPUTE_THREAD):
        if span.name in PIPELINE_SPANS and span.args.get("step") is not None:
            by_step.setdefault(span.args["step"], []).append(span)
    pieces = {rank: rank_intervals(trace, rank) for rank in trace.ranks}
    latency = _p2p_latency(trace)
    per_step = []
    for step, spans in sorted(by_step.items()):
        window = [[min(s.start_ns for s in spans), max(s.end_ns for s in spans)]]
        wall = total(window)
        ranks = []
        for rank in trace.ranks:
            compute = union((s.start_ns, s.end_ns) for s in spans if s.rank == rank)
            compute = intersect(compute, window)
            comm = intersect(pieces[rank]["comm"], window)
            exposed = subtract(comm, compute)
            busy = union(compute + comm)
            blocked = subtract(intersect(pieces[rank]["blocked"], window), busy)
            bubble = wall - total(busy)
            ranks.append({"rank": rank, "actions": sum(1 for s in spans if s.rank == rank),
                          "compute_s": total(compute) / 1e9, "exposed_comm_s": total(exposed) / 1e9,
                          "bubble_s": bubble / 1e9, "blocked_s": total(blocked) / 1e9,
                          "overhead_s": (bubble - total(blocked)) / 1e9})
        bubble_sum = sum(r["bubble_s"] for r in ranks)
        compute_sum = sum(r["compute_s"] for r in ranks)
        durations = {(s.rank, s.args.get("stage"), s.name, s.args.get("microbatch")): s.duration_ns / 1e9
                     for s in spans}
        def own(rank, a):
            return durations.get((rank, a.stage, SPAN_OF_KIND.get(a.kind), a.microbatch), 0.0)

        replay = simulate(actions, own, latency)
        # The same step with zero communication: its bubble is the schedule's and the compute
        # jitter's alone, so measured / this isolates what communication (and the executor) add.
        no_comm = simulate(actions, own, 0.0)
        per_step.append({"step": step, "window_s": wall / 1e9, "ranks": ranks,
                         "replayed_fraction": replay.bubble_fraction,
                         "replayed_no_comm_bubble_s": sum(no_comm.idle),
                         "bubble_over_no_comm_replay": bubble_sum / sum(no_comm.idle) if sum(no_comm.idle) else
                         float("inf"),
                         "bubble_fraction": bubble_sum / (len(ranks) * wall / 1e9) if wall else 0.0,
                         "bubble_ratio": bubble_sum / compute_sum if compute_sum else 0.0})
    if not per_step:
        raise RuntimeError(f"{trace.directory}: no pipeline compute spans with a step were traced")
    median = statistics.median
    stages = []
    for i, rank in enumerate(trace.ranks):
        row = {"rank": rank}
        for key in ("actions", "compute_s", "exposed_comm_s", "bubble_s", "blocked_s", "overhead_s"):
            row[key] = median(s["ranks"][i][key] for s in per_step)
        row["optimizer_s"] = median(_optimizer_seconds(trace, rank, s["step"]) for s in per_step)
        stages.append(row)
    window = median(s["window_s"] for s in per_step)
    for row in stages:
        row["bubble_fraction"] = row["bubble_s"] / window if window else 0.0
    computes = [r["compute_s"] for r in stages]
    fractions = [s["bubble_fraction"] for s in per_step]
    return {"window_s": window, "bubble_fraction": median(fractions),
            "bubble_fraction_range": [min(fractions), max(fractions)],
            "bubble_ratio": median(s["bubble_ratio"] for s in per_step), "stages": stages,
            "replayed_fraction": median(s["replayed_fraction"] for s in per_step),
            "bubble_over_no_comm_replay": median(s["bubble_over_no_comm_replay"] for s in per_step),
            "imbalance": max(computes) / statistics.mean(computes) if any(computes) else 1.0,
            "per_step": per_step, "action_costs": _action_costs(trace), "p2p_latency_s": latency}


def _optimizer_seconds(trace, rank: int, step) -> float:
    return sum(s.duration_ns for s in trace.spans(rank, COMPUTE_THREAD)
               if s.name == "optimizer" and s.args.get("step") == step) / 1e9


def _action_costs(trace) -> dict:
    """"rank/stage/span" -> median and count of that compute action's duration over the traced steps."""
    durations: dict = {}
    for span in trace.spans(thread=COMPUTE_THREAD):
        if span.name in PIPELINE_SPANS:
            key = f"{span.rank}/{span.args.get('stage')}/{span.name}"
            durations.setdefault(key, []).append(span.duration_ns / 1e9)
    return {key: {"median_s": statistics.median(d), "count": len(d)} for key, d in sorted(durations.items())}


def _p2p_latency(trace) -> float:
    """Median time from a send's start to the end of its receive, over receives posted before the send
    (so the receive ended when the bytes had arrived); 0 when no receive waited."""
    sends, delays = {}, []
    for span in trace.spans():
        if span.name == "send" and "flow" in span.args:
            sends[span.args["flow"]] = span
    for span in trace.spans():
        send = sends.get(span.args.get("flow")) if span.name == "recv" else None
        if send is not None and span.start_ns <= send.start_ns:
            delays.append((span.end_ns - send.start_ns) / 1e9)
    return statistics.median(delays) if delays else 0.0


def format_row(row: dict) -> str:
    """One (schedule, m) block: the bubble against theory, then one line per pipeline rank."""
    t, sim = row["theory"], row["simulated_with_measured_costs"]
    lines = [f"{row['schedule']:<11} m={row['microbatches']:<2} v={row['virtual_stages']}  bubble of total: "
             f"measured {row['bubble_fraction']:6.1%}  theory {t['fraction']:6.1%} ({t['source']})  "
             f"measured/theory {row['measured_over_theory']:.2f}  (steps {row['bubble_fraction_range'][0]:.1%}"
             f"–{row['bubble_fraction_range'][1]:.1%})"
             + (f"  best of {len(row['rounds'])} rounds: "
                + " ".join(f"{r['measured_over_theory']:.2f}" for r in row["rounds"])
                if len(row.get("rounds", [])) > 1 else ""),
             f"{'':<16}simulated: unit costs {t['simulated_unit_fraction']:6.1%}  median measured costs "
             f"{sim['fraction']:6.1%}  replay of each step's own durations {row['replayed_fraction']:6.1%}  "
             f"stage imbalance (max/mean compute) {row['imbalance']:.2f}  layers per stage {row['model']['split']}",
             f"{'':<16}bubble / ideal compute: measured {row['bubble_ratio']:6.1%}  theory {t['ratio']:6.1%}"
             f"  (textbook {t['textbook_ratio']:.1%})  window {row['window_s'] * 1e3:.1f} ms"
             f"  driver step {row['driver_step_s'] * 1e3:.1f} ms  p2p latency {row['p2p_latency_s'] * 1e6:.0f} us",
             f"{'':<16}{'rank':>4} {'compute ms':>11} {'exposed ms':>11} {'bubble ms':>10} {'blocked ms':>11} "
             f"{'overhead ms':>12} {'bubble':>7} {'optimizer ms':>13} {'gap/action us':>14}"]
    for s in row["stages"]:
        lines.append(f"{'':<16}{s['rank']:>4} {s['compute_s'] * 1e3:>11.1f} {s['exposed_comm_s'] * 1e3:>11.2f} "
                     f"{s['bubble_s'] * 1e3:>10.1f} {s['blocked_s'] * 1e3:>11.1f} {s['overhead_s'] * 1e3:>12.1f} "
                     f"{s['bubble_fraction']:>7.1%} {s['optimizer_s'] * 1e3:>13.1f} "
                     f"{s['overhead_s'] / max(s['actions'], 1) * 1e6:>14.0f}")
    costs = "  ".join(f"{key} {c['median_s'] * 1e3:.1f}" for key, c in row["action_costs"].items())
    lines.append(f"{'':<16}action ms (rank/stage/kind, median): {costs}")
    return "\n".join(lines)


def format_table(rows: list, verbose: bool = False) -> str:
    """What `ringpipe bench pipeline` prints: the setup, one table row per (schedule, m) with the
    README's columns, the targets; `verbose` adds each row's per-rank block (`format_row`)."""
    header = ("schedule", "m", "v", "measured bubble", "theory", "measured / theory", "each round",
              "range over steps", "bubble / no-comm replay")
    table = [header] + [(r["schedule"], str(r["microbatches"]), str(r["virtual_stages"]),
                         f"{r['bubble_fraction']:.1%}", f"{r['theory']['fraction']:.1%}",
                         f"{r['measured_over_theory']:.2f}",
                         " ".join(f"{x['measured_over_theory']:.2f}" for x in r.get("rounds", [])) or "-",
                         f"{r['bubble_fraction_range'][0]:.1%}–{r['bubble_fraction_range'][1]:.1%}",
                         f"{r.get('bubble_over_no_comm_replay_median', r['bubble_over_no_comm_replay']):.2f}")
                        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in table]
    lines = format_summary(rows).splitlines()
    setup, targets = lines[:2], lines[2:]
    details = [format_row(r) for r in rows] if verbose else []
    return "\n".join(setup + [""] + text + [""] + targets + ([""] + details if details else []))


def format_summary(rows: list) -> str:
    """The header with the setup and definitions, then the targets of issue #6 checked."""
    first = rows[0]
    model = first["model"]
    lines = [f"GPT {model['n_layer']}L×{model['n_embd']} ({model['n_head']} heads, block {model['block_size']}, "
             f"vocab {model['vocab_size']}, {model['dtype']}), micro-batch {model['microbatch_size']} sequences, "
             f"pp={first['pp']}, one BLAS thread per worker, median of "
             f"{first['steps']} traced steps after {first['warmup']} warmup"
             f"{', best of ' + str(len(first['rounds'])) + ' rounds' if len(first.get('rounds', [])) > 1 else ''}"
             f", load average "
             f"{first['load_average'][0]:.2f}, one core's float32 matmul before each row "
             f"{min(r['core_gflops'] for r in rows):.0f}–{max(r['core_gflops'] for r in rows):.0f} GFLOP/s",
             "bubble = idle time in the step window shared by all ranks (first to last F/B/I/W of any rank); "
             "time blocked waiting on a peer counts as bubble, moving bytes does not; optimizer excluded"]
    by = {(r["schedule"], r["microbatches"]): r for r in rows}
    for m in sorted({r["microbatches"] for r in rows}):
        one = by.get(("1f1b", m))
        if one:
            ok = one["measured_over_theory"] <= 1.25
            lines.append(f"target m={m}: 1f1b measured/theory {one['measured_over_theory']:.2f} ≤ 1.25: "
                         f"{'yes' if ok else 'NO'}")
            ratio = one.get("bubble_over_no_comm_replay_median", one["bubble_over_no_comm_replay"])
            lines.append(f"target m={m}: 1f1b bubble / its no-communication replay {ratio:.2f} ≤ 1.1 (#15, median "
                         f"of rounds): {'yes' if ratio <= 1.1 else 'NO'}")
        zb = by.get(("zb-h1", m))
        if one and zb:
            ok = zb["bubble_fraction"] < one["bubble_fraction"]
            lines.append(f"target m={m}: zb-h1 {zb['bubble_fraction']:.1%} < 1f1b {one['bubble_fraction']:.1%}: "
                         f"{'yes' if ok else 'NO'}")
    return "\n".join(lines)

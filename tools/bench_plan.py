"""How right the planner is: its predictions next to measured runs on this machine, and next to
Megatron-LM's published throughput (tools/bench_plan_published.py).

    python -m ringpipe.tools.bench_plan --json plan.json            # both parts
    python -m ringpipe.tools.bench_plan --part published

This machine: the machine is calibrated for the benchmark's model first (tools/plan_calibration.py,
the same code as `ringpipe plan --calibrate`); then every layout runs in a fresh local cluster
(one BLAS thread per worker, as `ringpipe train` runs them). Measured per rank: the peak resident
memory (VmHWM) minus the same worker's VmHWM before the trainer was built (the idle worker: the
interpreter, NumPy, ringpipe's modules, the C kernels); per step: the driver's wall time of each
step, the median of `steps` steps after `warmup`. Predicted: the planner's memory of that pipeline
rank (the larger of the initialisation and training peaks) and its step time.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.memory import Candidate, layout_memory
from ringpipe.model.planning.step_time import predict_step
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.run_dir import TOKEN_FILE
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime import Cluster
from ringpipe.runtime.files import write_json, write_text
from ringpipe.tools.bench_data_parallel import CORPUS
from ringpipe.tools.script_args import ScriptParser, at_least, writable_file

MODEL = dict(n_layer=4, n_head=12, n_embd=768, block_size=32)  # ~28 M parameters: ≥ 200 MB of state per rank
BATCH = 4
LAYOUTS = [Candidate(), Candidate(dp=2), Candidate(dp=2, zero=1), Candidate(tp=2),
           Candidate(tp=2, sequence_parallel=True),
           Candidate(pp=2, microbatches=4), Candidate(pp=2, schedule="gpipe", microbatches=4),
           Candidate(pp=2, schedule="interleaved", virtual_stages=2, microbatches=4),
           Candidate(pp=2, schedule="zb-h1", microbatches=4), Candidate(recompute=True),
           Candidate(pp=2, microbatches=4, recompute=True)]


def peak_rss(comm) -> int:
    """This worker's VmHWM in bytes (run on every rank)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def cpu_seconds(comm) -> float:
    """This worker's CPU time so far (user + system, every thread)."""
    times = os.times()
    return times.user + times.system


def idle_rss(comm) -> int:
    """VmHWM once the modules a trainer needs are imported and the kernels loaded, before any model."""
    import ringpipe.model.training.parallel_trainer  # noqa: F401 (imported: part of the idle baseline)
    from ringpipe.model.nn import kernels

    kernels.library()
    return peak_rss(comm)


def measure(config: TrainConfig, candidate: Candidate, token_file: str, vocab_size: int, warmup: int, steps: int):
    layout = Layout(candidate.dp, candidate.tp, candidate.pp, candidate.schedule, candidate.virtual_stages,
                    candidate.sequence_parallel, candidate.zero)
    config = dataclasses.replace(config, microbatches=candidate.microbatches)
    config.model.recompute = candidate.recompute
    with Cluster(layout.world_size, threads_per_worker=1) as cluster:
        baseline = cluster.run(idle_rss)
        trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout), token_file,
                                 vocab_size)
        coordinates = trainers.coordinates().result()
        seconds = []
        for step in range(warmup + steps):
            if step == warmup:
                cpu_before = cluster.run(cpu_seconds)
            start = time.perf_counter()
            trainers.train_step(step).result()
            if step >= warmup:
                seconds.append(time.perf_counter() - start)
        cpu = [(after - before) / steps for before, after in zip(cpu_before, cluster.run(cpu_seconds))]
        peaks = cluster.run(peak_rss)
    per_pp = {}
    for coords, peak, idle in zip(coordinates, peaks, baseline):
        per_pp[coords["pp"]] = max(per_pp.get(coords["pp"], 0), peak - idle)
    return per_pp, statistics.median(seconds), seconds, max(cpu)


def busy_seconds(timing) -> float:
    """A rank's predicted computing per step: the step less the pipeline bubble's idle share."""
    return timing.seconds - timing.parts.get("pipeline (compute, tp, bubble)", 0.0) * timing.bubble_fraction


def run_this_machine(warmup=2, steps=10, layouts=LAYOUTS, machine=None, progress=print) -> dict:
    from ringpipe.tools.plan_calibration import background_load, calibrate, probe_seconds

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        write_text(corpus, CORPUS)
        config = TrainConfig(data=corpus, tokenizer="char", batch_size=BATCH, steps=warmup + steps, eval_iters=1,
                             **MODEL)
        driver = Trainer.create(config, os.path.join(tmp, "run"))
        vocab_size = driver.tokenizer.vocab_size
        del driver
        inventory = GPT2Inventory(config.gpt_config(vocab_size))
        if machine is None:
            rows = sorted({BATCH // (c.dp * c.microbatches) for c in layouts})
            machine = calibrate(inventory, rows, [2], progress=progress)
        results = []
        for candidate in layouts:
            predicted_memory = layout_memory(inventory, candidate, BATCH)
            # the other work on the cores just before the run (not the load average: it still counts
            # the previous layout's workers for a minute after they end)
            load = background_load()
            probe_ratio = probe_seconds() / machine.calibration["probe_seconds"]
            timing = predict_step(inventory, candidate, BATCH, machine, ranks_per_host=candidate.world_size,
                                  background_load=load, probe_ratio=probe_ratio)
            per_pp, median, seconds, cpu = measure(config, candidate, os.path.join(tmp, "run", TOKEN_FILE), vocab_size,
                                                   warmup, steps)
            ranks = []
            for memory in predicted_memory:
                measured = per_pp[memory.pp_rank]
                state = memory.weights + memory.gradients + memory.optimizer
                ranks.append({"pp_rank": memory.pp_rank, "state_bytes": state,
                              "predicted_bytes": memory.peak, "measured_bytes": measured,
                              "error": round(memory.peak / measured - 1, 4), "split": memory.as_dict()})
            row = {"layout": candidate.label(), "ranks": ranks, "predicted_seconds": timing.seconds,
                   "measured_seconds": median, "step_seconds": seconds,
                   # the busiest rank's CPU seconds per step, which other work on the cores does not
                   # stretch, against the prediction for cores of its own (no other work, the probe
                   # as at calibration) less the bubble's idle share
                   "cpu_seconds_per_step": cpu, "predicted_busy_seconds": busy_seconds(
                       predict_step(inventory, candidate, BATCH, machine, ranks_per_host=candidate.world_size,
                                    background_load=0.0)),
                   "time_error": round(timing.seconds / median - 1, 4), "background_load": round(load, 2),
                   "load_average": os.getloadavg()[0],
                   "probe_ratio": round(probe_ratio, 3)}
            results.append(row)
            memory_text = ", ".join(f"pp{r['pp_rank']} {r['predicted_bytes'] / 1e6:.0f}/"
                                    f"{r['measured_bytes'] / 1e6:.0f} MB ({r['error']:+.1%})" for r in ranks)
            progress(f"{row['layout']:<36} memory {memory_text}; step {timing.seconds * 1e3:.0f}/{median * 1e3:.0f} ms "
                     f"({row['time_error']:+.1%}), busy {row['predicted_busy_seconds'] * 1e3:.0f}/{cpu * 1e3:.0f} ms CPU; other runnable {load:.1f}, probe ×{probe_ratio:.2f}")
    fastest = sorted(results, key=lambda r: r["measured_seconds"])[:2]
    best = min(results, key=lambda r: r["predicted_seconds"])
    memory_errors = [abs(r["error"]) for row in results for r in row["ranks"] if r["state_bytes"] >= 200e6]
    return {"machine": machine.name, "model": MODEL, "batch_size": BATCH, "layouts": results,
            "planner_best": best["layout"], "two_fastest_measured": [r["layout"] for r in fastest],
            "best_among_two_fastest": best in fastest,
            "max_memory_error": max(memory_errors) if memory_errors else None,
            "max_time_error": max(abs(r["time_error"]) for r in results),
            "calibration": machine.calibration and {k: v for k, v in machine.calibration.items() if k != "compute"}}


def main(argv=None):
    parser = ScriptParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("this-machine", "published", "both"), default="both")
    parser.add_argument("--steps", type=at_least(1), default=10)
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--json", dest="json_path", type=writable_file, default=None)
    args = parser.parse_args(argv)
    result = {}
    if args.part in ("published", "both"):
        from ringpipe.tools.bench_plan_published import run as run_published

        result["published"] = run_published()
    if args.part in ("this-machine", "both"):
        result["this_machine"] = run_this_machine(args.warmup, args.steps)
    if args.json_path:
        write_json(args.json_path, result, indent=1)
    return result


if __name__ == "__main__":
    main()

"""Data-parallel weak scaling: step time at dp = 1 and dp = N with the same per-rank batch.

Each dp size runs on its own local cluster, one BLAS thread per worker, the `ParallelTrainer` actor
with bucketed gradient averaging (optionally ZeRO-1); the sizes take turns in rounds.
Efficiency = t(dp=1) / t(dp=N): 100 % when adding replicas costs nothing. Process CPU time per rank
and step is reported too: other processes cannot inflate it, so it shows the work dp adds.
Overlap comes from the trainer's own timers (medians over steps):

    overlapped_s   first bucket launch → end of backward: communication in flight while computing
    exposed_s      end of backward → every bucket reduced: communication nobody hid
    overlap        overlapped_s / (overlapped_s + exposed_s)
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from contextlib import ExitStack

from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import TOKEN_FILE
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime import Cluster
from ringpipe.runtime.files import write_text

CORPUS = "".join(f"{i} little pigs went to market, {i * 7 % 13} came home; the wolf waited {i % 5} days.\n"
                 for i in range(4000))


def run(dp_sizes=(1, 2), n_layer: int = 4, n_head: int = 4, n_embd: int = 128, block_size: int = 64,
        batch_per_rank: int = 12, microbatches: int = 1, steps: int = 20, warmup: int = 3, rounds: int = 3,
        bucket_bytes: int = 1 << 20, zero: int = 0, independent: bool = True, timeout: float = 300.0) -> dict:
    """Time each dp size for `rounds` alternating rounds of `steps` steps (after `warmup`); a row
    keeps its best round (the least disturbed by other processes). With `independent`, one more
    row: N unconnected dp=1 runs at once, the machine's own limit for N busy workers (shared
    memory bandwidth and caches) with no communication at all. Returns rows and efficiencies."""
    if batch_per_rank % microbatches:
        raise ValueError(f"per-rank batch {batch_per_rank} is not divisible by microbatches {microbatches}")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        corpus = os.path.join(tmp, "corpus.txt")
        write_text(corpus, CORPUS)
        base = TrainConfig(data=corpus, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                           batch_size=batch_per_rank, microbatches=microbatches, steps=10 ** 6, warmup=10,
                           dtype="float32")
        driver = Trainer.create(base, os.path.join(tmp, "run"))  # tokenizes once: tokens.bin and the vocabulary
        token_file = os.path.join(tmp, "run", TOKEN_FILE)

        def start(dp: int, copies: int = 1) -> list:
            config = dataclasses.replace(base, batch_size=batch_per_rank * dp)
            layout = Layout(dp=dp, zero=zero)
            layout.validate(config)
            runs = []
            for _ in range(copies):
                cluster = stack.enter_context(Cluster(dp, threads_per_worker=1, timeout=timeout))
                runs.append((cluster, cluster.spawn(ParallelTrainer, dataclasses.asdict(config),
                                                    dataclasses.asdict(layout), token_file,
                                                    driver.tokenizer.vocab_size, bucket_bytes=bucket_bytes)))
            _time_steps(runs, range(warmup))
            return runs

        setups = [(f"dp={dp}", dp, start(dp)) for dp in dp_sizes]
        if independent:
            setups.append((f"{dp_sizes[-1]}× dp=1", dp_sizes[-1], start(1, copies=dp_sizes[-1])))
        best, every, next_step = {}, {}, warmup
        for _ in range(rounds):  # alternate, so a burst of outside load hits every setup alike
            for label, dp, runs in setups:
                row = {"setup": label, "dp": dp, **_time_steps(runs, range(next_step, next_step + steps))}
                every.setdefault(label, []).append(row["step_s"])
                if label not in best or row["step_s"] < best[label]["step_s"]:
                    best[label] = row
            next_step += steps
    rows = [best[label] for label, _, _ in setups]
    first = setups[0][0]
    for row in rows:
        row["efficiency"] = rows[0]["step_s"] / row["step_s"]
        # Issue #15's protocol: every round kept, and the efficiency of each round's own pair (the
        # setups ran back to back) with their median.
        row["round_step_s"] = every[row["setup"]]
        row["round_efficiency"] = [a / b for a, b in zip(every[first], every[row["setup"]])]
        row["efficiency_median"] = statistics.median(row["round_efficiency"])
    params = sum(p.size for p in driver.gpt.params.values())
    return {"model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
                      "params": int(params), "gradient_bytes": int(params) * 4},
            "batch_per_rank": batch_per_rank, "microbatches": microbatches, "bucket_bytes": bucket_bytes,
            "zero": zero, "steps": steps, "rounds": rounds, "load_average": os.getloadavg(), "rows": rows}


def process_cpu_seconds(comm) -> float:
    """CPU time of this worker process so far (compute and engine threads): outside load cannot
    inflate it, so its growth from dp=1 to dp=N is the work data parallelism adds per rank."""
    return time.process_time()


def _time_steps(runs: list, steps: range) -> dict:
    """Step `runs` [(cluster, trainers)] together; medians over steps of the slowest rank's numbers."""
    cpu_before = [c for cluster, _ in runs for c in cluster.run(process_cpu_seconds)]
    step_s, overlapped, exposed, buckets = [], [], [], 0
    for step in steps:
        futures = [trainers.train_step(step) for _, trainers in runs]
        metrics = [m for future in futures for m in future.result()]
        step_s.append(max(m["seconds"] for m in metrics))  # the slowest replica sets the pace
        overlapped.append(statistics.mean(m["data_parallel"]["overlapped_s"] for m in metrics))
        exposed.append(statistics.mean(m["data_parallel"]["exposed_s"] for m in metrics))
        buckets = metrics[0]["data_parallel"]["buckets"]
    cpu_after = [c for cluster, _ in runs for c in cluster.run(process_cpu_seconds)]
    if not steps:
        return {}
    row = {"step_s": statistics.median(step_s), "buckets": buckets, "overlapped_s": statistics.median(overlapped),
           "exposed_s": statistics.median(exposed),
           "cpu_s_per_rank": max(a - b for a, b in zip(cpu_after, cpu_before)) / len(steps)}
    communicating = row["overlapped_s"] + row["exposed_s"]
    row["overlap"] = row["overlapped_s"] / communicating if len(metrics) > len(runs) and communicating > 0 else None
    return row


def format_table(result: dict) -> str:
    model = result["model"]
    lines = [f"GPT {model['n_layer']}L×{model['n_embd']}, {model['params']:,} parameters "
             f"({model['gradient_bytes'] / 2 ** 20:.1f} MiB of float32 gradients), {result['batch_per_rank']} "
             f"sequences × {model['block_size']} tokens per rank, {result['microbatches']} micro-batch(es), "
             f"buckets ≤ {result['bucket_bytes'] / 2 ** 10:.0f} KiB, zero={result['zero']}, "
             f"best of {result['rounds']} rounds of {result['steps']} steps (median), "
             f"load average {result['load_average'][0]:.2f}",
             f"{'setup':>9} {'step ms':>9} {'efficiency':>11} {'buckets':>8} {'overlapped ms':>14} "
             f"{'exposed ms':>11} {'overlap':>8} {'cpu ms/rank':>12}"]
    for row in result["rows"]:
        overlap = f"{row['overlap']:.0%}" if row["overlap"] is not None else "-"
        lines.append(f"{row['setup']:>9} {row['step_s'] * 1e3:>9.1f} {row['efficiency']:>11.1%} "
                     f"{row['buckets']:>8} {row['overlapped_s'] * 1e3:>14.2f} {row['exposed_s'] * 1e3:>11.2f} "
                     f"{overlap:>8} {row['cpu_s_per_rank'] * 1e3:>12.1f}")
    return "\n".join(lines)

"""`ringpipe bench memory`: train a model that does not fit one worker, each worker under a memory limit.

    result = run(start_run=DistributedRun, n_layer=24, n_embd=1024, n_head=16, vocab_size=50257,
                 block_size=256, steps=3, tp=2, pp=2, worker_limit_bytes=3 << 30, out=DIR)
    print(format_table(result))

The run is the real one (`start_run` is cluster/distributed_train.py's DistributedRun, passed in by the
command: tools/ does not import cluster/): it trains, evaluates, checkpoints, exports the model, then
resumes from the checkpoint in new workers and trains one step more. The data are uniform random
characters of a `vocab_size`-letter alphabet, so the `char` tokenizer has that vocabulary and saves
with the checkpoint (the data do not matter to memory). Each worker is moved, before it builds
anything, into a memory cgroup of its own (runtime/memory_cgroup.py) limited below what one process
would need for float32 weights + gradients + AdamW moments. Reported per rank and for the driver:
peak RSS (VmHWM), the bytes of weights / gradients / optimizer state / activations, and the cgroup's
resident peak (anonymous + shared + kernel memory, polled: the target metric) beside its page cache
(checkpoint and export writes, which the kernel reclaims at the limit) and its peak charge, which
counts both; and the single-process need (computed: it does not fit). A worker the cgroup's OOM
killer ends is one line naming the rank and the limit. `ringpipe bench memory` exits non-zero when a
target is missed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from ringpipe.model.gpt2.config import GPTConfig, param_shapes
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout
from ringpipe.model.training.run_setup import RunSetup
from ringpipe.runtime import WorkerLost
from ringpipe.runtime.memory_cgroup import MemoryCgroup, UsageSampler, WorkerKilled
from ringpipe.runtime.process_memory import peak_rss_bytes, reset_peak_rss, rss_bytes

GiB = 1 << 30
DRIVER_TARGET = 0.05  # the driver's peak RSS above its idle baseline, as a fraction of the float32 weights
BALANCE_TARGET = 0.10  # each rank's weights + optimizer bytes, off 1/(tp·pp) of the model's


def single_process_bytes(config: GPTConfig) -> dict:
    """What one float32 process would hold (computed): weights, gradients, AdamW's two moments."""
    weights = 4 * sum(math.prod(shape) for shape in param_shapes(config).values())
    return {"weights": weights, "gradients": weights, "optimizer": 2 * weights, "total": 4 * weights}


def oom_explanation(groups: dict, pids: dict) -> str | None:
    """One line if a cgroup's OOM killer ended a worker (`groups`, `pids`: by rank), else None."""
    killed = [rank for rank, group in sorted(groups.items()) if group.oom_kills]
    if not killed:
        return None
    group = groups[killed[0]]
    return (f"worker rank {killed[0]} (pid {pids[killed[0]]}) was killed by the out-of-memory killer of its cgroup: "
            f"its limit of {group.limit_bytes / GiB:.2f} GiB was reached ({group.path})"
            + (f"; so was rank {killed[1]}" if len(killed) == 2 else
               f"; so were ranks {', '.join(map(str, killed[1:]))}" if len(killed) > 2 else ""))


def _corpus(out: str, vocab_size: int, characters: int, seed: int) -> str:
    """A text of uniform random characters from an alphabet of `vocab_size` (each at least once), so
    that the `char` tokenizer has exactly that vocabulary and saves with the checkpoint."""
    alphabet = np.array([chr(c) for c in range(0x100, 0x100 + vocab_size + 0x800) if not 0xD800 <= c < 0xE000][
        :vocab_size])
    text = "".join(alphabet) + "".join(alphabet[np.random.default_rng(seed).integers(0, vocab_size, size=characters)])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "corpus.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def run(start_run, *, n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, block_size=256, batch_size=2,
        microbatches=2, steps=3, dp=1, tp=2, pp=2, zero=0, worker_limit_bytes=3 * GiB, out="bench-memory",
        timeout=900.0, say=lambda line: None) -> dict:
    """Train `steps` steps, evaluate, checkpoint, export, then resume from the checkpoint (new workers)
    and train one step more, every worker under the limit; returns the result dict (see format_table)."""
    config = TrainConfig(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size, batch_size=batch_size,
                         microbatches=microbatches, steps=steps, eval_iters=1, eval_every=0, checkpoint_every=0,
                         warmup=0, dtype="float32", val_fraction=0.1, tokenizer="char")
    config.validate()
    layout = Layout(dp=dp, tp=tp, pp=pp, zero=zero)
    layout.validate(config)
    model = config.model_config(vocab_size)
    need = single_process_bytes(model)
    if worker_limit_bytes >= need["total"]:
        raise ValueError(f"--worker-memory {worker_limit_bytes / GiB:.2f} GiB is not below what one process needs "
                         f"({need['total'] / GiB:.2f} GiB of float32 weights, gradients and AdamW moments): "
                         "the bench would prove nothing")
    # enough windows for every step's batch and the evaluation, whatever the sampler does
    characters = max(20 * (block_size + 1) * batch_size * (steps + 3), 100 * (block_size + 1))
    config = dataclasses.replace(config, data=_corpus(out, vocab_size, characters, config.seed))
    setup = RunSetup.create(config, out)
    setup.write_token_file()
    # The driver's idle baseline: Python, NumPy, ringpipe imported, the corpus tokenized and written.
    baseline = rss_bytes()
    reset = reset_peak_rss()
    baseline = baseline if reset else peak_rss_bytes()
    groups, pids = {}, {}

    def limit_workers(cluster):
        for rank, pid in enumerate(cluster.pids):
            groups[rank] = MemoryCgroup.create(f"ringpipe-bench-{os.getpid()}-rank{rank}", worker_limit_bytes)
            groups[rank].add(pid)
            pids[rank] = pid

    losses, started, timings = [], time.perf_counter(), {}

    def lap(name):
        timings[name] = time.perf_counter() - started
        say(f"{name} ({timings[name]:.0f} s since start)")

    sampler = UsageSampler(groups).start()  # follows `groups` as limit_workers fills it
    try:
        say(f"starting {layout.world_size} workers, each limited to {worker_limit_bytes / GiB:.2f} GiB")
        distributed = start_run(config, layout, out, setup=setup, workers_started=limit_workers, timeout=timeout,
                                report=say)
        try:
            for step in range(steps):
                losses.append(distributed.train_step(step)["loss"])
                lap(f"step {step + 1}/{steps} loss {losses[-1]:.4f}")
            val_loss = distributed.evaluate()["val_loss"]
            reports = distributed.memory_report()
            distributed.save_checkpoint()
            lap("checkpoint saved")
            distributed.save_model()
            lap("model exported")
            cgroup_peaks = {rank: group.peak_bytes for rank, group in groups.items()}
        finally:
            distributed.close()
        usage_peaks = sampler.stop()
        _remove(groups.values())
        sampler = UsageSampler(groups).start()
        # Resume in new workers, under new limits: read the shards, train one step more.
        more = dataclasses.replace(config, steps=steps + 1)
        resumed = start_run(more, layout, out, resume=True, workers_started=limit_workers, timeout=timeout)
        try:
            losses.append(resumed.train_step(steps)["loss"])
            lap(f"resumed, step {steps + 1} loss {losses[-1]:.4f}")
            resumed_reports = resumed.memory_report()
            resumed_peaks = {rank: group.peak_bytes for rank, group in groups.items()}
        finally:
            resumed.close()
        resumed_usage_peaks = sampler.stop()
    except WorkerLost:
        explanation = oom_explanation(groups, pids)
        if explanation is None:
            raise
        raise WorkerKilled(explanation) from None
    finally:
        sampler.stop()
        _remove(groups.values())
    driver_peak = peak_rss_bytes()
    for phase, peaks, usage in ((reports, cgroup_peaks, usage_peaks), (resumed_reports, resumed_peaks,
                                                                        resumed_usage_peaks)):
        for report in phase:
            sampled = usage.get(report["rank"], {})
            report.update(cgroup_peak=peaks.get(report["rank"]), cgroup_resident_peak=sampled.get("resident"),
                          cgroup_cache_peak=sampled.get("file"))
    result = _result(config, layout, model, need, reports, worker_limit_bytes, baseline, driver_peak, losses, val_loss,
                     time.perf_counter() - started, reset, groups)
    result["resumed_ranks"] = resumed_reports
    result["run"]["timings"] = timings
    # Reached only if no worker was OOM-killed (a cgroup's charge never passes its limit: it counts
    # the page cache of the checkpoint writes too, which the kernel reclaims at the limit).
    result["targets"]["checkpoint_export_and_resume_completed_under_the_limits"] = True
    result["targets"]["worker_resident_peaks_within_the_limit"] = all(
        r["cgroup_resident_peak"] is not None and r["cgroup_resident_peak"] <= worker_limit_bytes
        for r in reports + resumed_reports)
    return result


def _remove(groups) -> None:
    for group in groups:
        for _ in range(50):  # the workers may take a moment to be reaped after close()
            try:
                group.remove()
                break
            except OSError:
                time.sleep(0.1)


def _result(config, layout, model, need, reports, limit, baseline, driver_peak, losses, val_loss, seconds, reset,
            groups) -> dict:
    replica = [r for r in reports if r["coordinates"]["dp"] == 0]
    share = sum(r["weights"] + r["optimizer"] for r in replica) / len(replica)
    unique_share = (need["weights"] + need["optimizer"] / (layout.dp if layout.zero else 1)) / (layout.tp * layout.pp)
    ranks = []
    for report in reports:
        held = report["weights"] + report["optimizer"]
        ranks.append({**report, "weights_and_optimizer": held, "off_share": held / share - 1,
                      "off_unique_share": held / unique_share - 1})
    growth = driver_peak - baseline
    return {
        "model": {"n_layer": model.n_layer, "n_embd": model.n_embd, "n_head": model.n_head,
                  "vocab_size": model.vocab_size, "block_size": model.block_size, "dtype": "float32"},
        "run": {"dp": layout.dp, "tp": layout.tp, "pp": layout.pp, "zero": layout.zero, "steps": config.steps,
                "batch_size": config.batch_size, "microbatches": config.microbatches, "losses": losses,
                "val_loss": val_loss, "seconds": seconds},
        "worker_limit_bytes": limit, "moves_charges": all(g.moves_charges for g in groups.values()),
        "single_process": need, "ranks": ranks,
        "driver": {"baseline_rss": baseline, "peak_rss": driver_peak, "growth": growth,
                   "baseline_is": "RSS after imports, VmHWM reset" if reset else "VmHWM after imports",
                   "growth_of_weights": growth / need["weights"]},
        "targets": {"driver_growth_below_5_percent_of_weights": growth < DRIVER_TARGET * need["weights"],
                    "ranks_within_10_percent_of_their_share_of_the_model": all(
                        abs(r["off_unique_share"]) <= BALANCE_TARGET for r in ranks),
                    "every_rank_below_single_process_need": all(r["weights"] + r["gradients"] + r["optimizer"]
                                                                < need["total"] for r in ranks)},
    }


def _mib(value) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f}"


def format_table(result: dict) -> str:
    mib = 1 << 20
    model, run_, need, driver = result["model"], result["run"], result["single_process"], result["driver"]
    lines = [f"GPT {model['n_layer']} layers × {model['n_embd']} wide, {model['n_head']} heads, vocab "
             f"{model['vocab_size']}, block {model['block_size']}, float32; dp {run_['dp']} × tp {run_['tp']} × pp "
             f"{run_['pp']}{' ZeRO-1' if run_['zero'] else ''}; {run_['steps']} steps of {run_['batch_size']} "
             f"sequences ({run_['microbatches']} micro-batches), val loss {run_['val_loss']:.3f}, "
             f"{run_['seconds']:.0f} s; each worker limited to {result['worker_limit_bytes'] / mib:.0f} MiB",
             "",
             f"{'rank':>6} {'(pp,dp,tp)':>10} {'weights':>9} {'grads':>9} {'optim':>9} {'activ.':>9} "
             f"{'VmHWM':>9} {'resident':>9} {'cache':>7} {'charge':>7} {'w+opt vs 1/(tp·pp)':>19}   (MiB)"]
    for r in result["ranks"]:
        c = r["coordinates"]
        cgroup = [_mib(r.get(key)) for key in ("cgroup_resident_peak", "cgroup_cache_peak", "cgroup_peak")]
        lines.append(f"{r['rank']:>6} {'(%d,%d,%d)' % (c['pp'], c['dp'], c['tp']):>10} {r['weights'] / mib:>9.0f} "
                     f"{r['gradients'] / mib:>9.0f} {r['optimizer'] / mib:>9.0f} {r['activations_peak'] / mib:>9.0f} "
                     f"{r['peak_rss'] / mib:>9.0f} {cgroup[0]:>9} {cgroup[1]:>7} {cgroup[2]:>7} "
                     f"{r['off_unique_share']:>+18.1%}")
    lines.append(f"{'driver':>6} {'':>10} {0:>9} {0:>9} {0:>9} {0:>9} {driver['peak_rss'] / mib:>9.0f} {'-':>9}   "
                 f"baseline {driver['baseline_rss'] / mib:.0f} MiB ({driver['baseline_is']}), "
                 f"peak above it {driver['growth'] / mib:.1f} MiB = {driver['growth_of_weights']:.2%} of the weights")
    lines.append(f"{'1 proc':>6} {'':>10} {need['weights'] / mib:>9.0f} {need['gradients'] / mib:>9.0f} "
                 f"{need['optimizer'] / mib:>9.0f} {'?':>9} {need['total'] / mib:>9.0f}+ {'-':>9}   computed; "
                 "activations not included")
    if "resumed_ranks" in result:
        timings = result["run"]["timings"]
        peaks = ", ".join(f"{_mib(r.get('cgroup_resident_peak'))}+{_mib(r.get('cgroup_cache_peak'))}"
                          for r in result["resumed_ranks"])
        lines.append(f"checkpoint saved by the ranks at {timings['checkpoint saved']:.0f} s, model exported by "
                     f"streaming at {timings['model exported']:.0f} s; resumed in new workers (cgroup peaks, resident "
                     f"+ cache: {peaks} MiB) and trained step {run_['steps'] + 1}, loss {run_['losses'][-1]:.3f}")
    lines.append("resident: anonymous + shared + kernel memory, polled every 10 ms; cache: page cache of files "
                 "written, which the kernel reclaims at the limit; charge: the cgroup's peak, both counted")
    lines.append("")
    for name, met in result["targets"].items():
        lines.append(f"{'met' if met else 'MISSED':>6}  {name.replace('_', ' ')}")
    return "\n".join(lines)

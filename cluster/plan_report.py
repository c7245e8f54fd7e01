"""What `ringpipe train` says about its layout: the planner's prediction before training, and the
measured values beside it after the first steps (model/planning)."""
from __future__ import annotations

import statistics

import click

MEASURE_AFTER = 5  # steps: the first ones warm caches and build buffers


def predict_run(config, layout, vocab_size: int, ranks_per_host: int | None = None) -> dict | None:
    """The planner's prediction for this run ({"memory": [RankMemory], "timing": StepTiming or None,
    "machine": Machine}), printed to stderr; None when the planner does not know this model."""
    from ringpipe.cluster.plan_cmd import duration, format_memory, rate
    from ringpipe.model.planning.machine import this_machine
    from ringpipe.model.planning.step_time import predict_step

    planned = planned_memory(config, layout, vocab_size)
    if planned is None:
        return None
    inventory, memory, candidate = planned
    worst = max(memory, key=lambda m: m.total)
    machine = this_machine()
    click.echo(f"plan: {candidate.label()} — most-loaded rank {format_memory(worst)}", err=True)
    timing = None
    if machine.calibration and machine.calibration.get("compute", {}).get("model", {}).get("n_embd") is not None:
        timing = predict_step(inventory, candidate, config.batch_size, machine, ranks_per_host)
        click.echo(f"plan: step {duration(timing.seconds)} predicted, {rate(timing.tokens_per_second)} tokens/s, "
                   f"bubble {timing.bubble_fraction:.0%} ({machine.name})", err=True)
    else:
        click.echo("plan: no step time — this machine is not calibrated; run `ringpipe plan --calibrate` "
                   "with this run's model flags and --nproc", err=True)
    return {"memory": memory, "timing": timing, "machine": machine, "seconds": []}


def planned_memory(config, layout, vocab_size: int):
    """(inventory, [RankMemory] per pipeline rank, Candidate) of this run as the planner sees it; None
    when the planner does not know the model or the layout (an explicit split: it splits balanced)."""
    from ringpipe.model.planning.family import inventory_for
    from ringpipe.model.planning.memory import Candidate, layout_memory

    if layout.split is not None:
        return None
    try:
        inventory = inventory_for(config.family, config.model_config(vocab_size))
    except ValueError:
        return None
    candidate = Candidate(layout.dp, layout.tp, layout.pp, layout.schedule, layout.virtual_stages,
                          config.microbatches, layout.zero, layout.sequence_parallel,
                          getattr(config.model, "recompute", False))
    return inventory, layout_memory(inventory, candidate, config.batch_size), candidate


def after_step(prediction: dict | None, metrics: dict, trainer, steps_done: int, last: bool, progress=None) -> None:
    """Collect the step's time; after MEASURE_AFTER steps (or the last) print measured beside predicted."""
    if prediction is None or prediction.get("reported"):
        return
    if "tokens_per_s" in metrics and metrics["tokens_per_s"]:
        prediction["seconds"].append(metrics["tokens"] / metrics["tokens_per_s"])
    if steps_done < MEASURE_AFTER and not last:
        return
    prediction["reported"] = True
    if progress is not None:
        progress.end_line()
    measured = prediction["seconds"][1:] or prediction["seconds"]  # the first step warms up
    timing = prediction["timing"]
    if measured:
        seconds = statistics.median(measured)
        predicted = f"{timing.seconds * 1e3:.1f} ms predicted" if timing else "no prediction (uncalibrated)"
        click.echo(f"plan: step {seconds * 1e3:.1f} ms measured (median of {len(measured)}), {predicted}", err=True)
    peaks = worker_peak_rss(trainer)
    if peaks:
        from ringpipe.cluster.plan_cmd import size

        worst = max(m.peak for m in prediction["memory"])
        click.echo(f"plan: worker peak RSS {size(max(peaks))} measured (VmHWM, with the interpreter and "
                   f"libraries), {size(worst)} predicted without them", err=True)


def worker_peak_rss(trainer) -> list[int]:
    """VmHWM of each local worker process in bytes (none for remote workers or one process)."""
    from ringpipe.runtime.launch import LocalLauncher

    cluster = getattr(trainer, "cluster", None)
    if cluster is None or not isinstance(getattr(cluster, "launcher", None), LocalLauncher):
        return []
    peaks = []
    for rank in range(cluster.world_size):
        pid = cluster.launcher.pid(rank)
        try:
            with open(f"/proc/{pid}/status") as f:
                peaks += [int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")]
        except (OSError, TypeError):
            continue
    return peaks

"""`ringpipe plan`: every layout of a model on N ranks, with its memory per rank and step time,
ranked, before anything runs; `--calibrate` times this machine for it (model/planning, tools/plan_calibration.py)."""
from __future__ import annotations

import dataclasses

import click

from ringpipe.cluster.options import FiniteFloat, OutputFile, bad_flag, usage_error
from ringpipe.model.nn.mixed_precision import DTYPES
from ringpipe.model.planning.family import FAMILIES as INVENTORIES

REASONS_SHOWN = 3  # of the reasons no layout fits, in the one-line error
UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))


def unit_of(nbytes: float) -> tuple[str, int]:
    """The binary unit a size reads best in: the largest that leaves at least 1."""
    return next((name, scale) for name, scale in UNITS if nbytes >= scale or scale == 1)


def in_unit(nbytes: float, unit: tuple[str, int]) -> str:
    """`nbytes` in `unit`, three significant figures (at least the units digit)."""
    value = nbytes / unit[1]
    return f"{value:.{max(0, 3 - len(str(int(value))))}f}" if value and unit[1] > 1 else str(round(value))


def size(nbytes: float) -> str:
    """`nbytes` in the unit it reads best in: '512 KiB', '37.5 MiB', '14.8 GiB'."""
    unit = unit_of(nbytes)
    return f"{in_unit(nbytes, unit)} {unit[0]}"


def three_figures(value: float) -> str:
    """`value` to three significant figures in fixed notation, at least the units digit: 94.02 ->
    '94.0', 1234.5 -> '1234', 0.0871 -> '0.0871'."""
    if value < 0.9995:
        return f"{value:.3g}" if value >= 1e-3 else f"{value:.6f}".rstrip("0").rstrip(".")
    return f"{value:.{max(0, 3 - len(str(int(value))))}f}"


def duration(seconds: float) -> str:
    """Seconds in the unit that reads best: '1.23 s', '87.1 ms', '10.4 µs', '0 s'."""
    if seconds <= 0:
        return "0 s"
    # 0.9996 s reads '1.00 s', not '1000 ms': a unit is taken from where its three figures round to 1
    unit, scale = next(((u, k) for u, k in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)) if seconds >= 0.9995 * k),
                       ("ns", 1e-9))
    return f"{three_figures(seconds / scale)} {unit}"


def rate(per_second: float) -> str:
    """A count per second, k/M/G for thousands, millions, billions: '512', '94.0k', '2.06M'."""
    suffix, scale = next(((u, k) for u, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)) if per_second >= 0.9995 * k),
                         ("", 1.0))
    return f"{three_figures(per_second / scale)}{suffix}"


def format_memory(memory, cpu: bool = True) -> str:
    """The most-loaded rank's split (weights, gradients, optimizer, activations, communication,
    workspace), each part with its own unit."""
    return (f"pp{memory.pp_rank}: {size(memory.total)} = W {size(memory.weights)} G {size(memory.gradients)} "
            f"O {size(memory.optimizer)} A {size(memory.activations)} C {size(memory.communication)} "
            f"ws {size(memory.workspace)}" + (f"; cpu process peak {size(memory.peak)}"
                                              + (" (building the trainer)" if memory.host_peak > memory.total - memory.shared_memory else "")
                                              if cpu and memory.peak > memory.total else ""))


TIE = 0.01  # step times within 1 % of each other: the model is not that exact, something else decides


def why_best(report) -> str:
    """One line: why the first layout is ahead of the runner-up — the part of the step it saves
    most in when it is faster, else (speeds within TIE) what decides between them: memory."""
    if not report.ranked:
        return ""
    best = report.ranked[0]
    if len(report.ranked) == 1:
        return f"{best[0].label()} is the only layout that fits"
    other = report.ranked[1]
    ratio = other[2].seconds / best[2].seconds
    if ratio < 1 + TIE:
        ours, theirs = (max(m.total for m in layout[1]) for layout in (best, other))
        line = (f"{best[0].label()} wins: as fast as the runner-up {other[0].label()} ({duration(best[2].seconds)} "
                f"vs {duration(other[2].seconds)} per step, within {TIE:.0%})")
        if ours < theirs * (1 - TIE):
            return line + f"; what decides is memory: {size(ours)} vs {size(theirs)} on the most-loaded rank"
        if ours > theirs * (1 + TIE):
            return line + (f"; it is ahead by only {ratio - 1:.1%} — the runner-up needs less memory "
                           f"({size(theirs)} vs {size(ours)} on the most-loaded rank), the better pick where memory is short")
        return line + f"; the same memory too ({size(ours)} on the most-loaded rank): either will do"
    parts = set(best[2].parts) | set(other[2].parts)
    part = max(parts, key=lambda p: other[2].parts.get(p, 0.0) - best[2].parts.get(p, 0.0))
    gain = other[2].parts.get(part, 0.0) - best[2].parts.get(part, 0.0)
    line = f"{best[0].label()} wins: {ratio:.2f}× the runner-up's speed ({other[0].label()})"
    if gain > 0:  # the parts' differences add up to the (positive) difference of the steps
        line += f"; the largest saving is {part} ({duration(gain)})"
    if best[2].bubble_fraction < other[2].bubble_fraction - 0.01:
        line += f", bubble {best[2].bubble_fraction:.0%} vs {other[2].bubble_fraction:.0%}"
    return line


def format_plan(report, top: int, machine, calibrated: bool) -> str:
    lines = [f"machine: {machine.name}; memory limit per rank {size(report.memory_limit)}",
             f"{'#':>3}  {'layout':<40} {'step':>9} {'tokens/s':>9} {'MFU':>6} {'bubble':>6}  "
             "most-loaded rank (weights gradients optimizer activations comm workspace)"]
    for k, (candidate, memory, timing) in enumerate(report.ranked[:top], start=1):
        worst = max(memory, key=lambda m: m.total)
        lines.append(f"{k:>3}  {candidate.label():<40} {duration(timing.seconds):>9} {rate(timing.tokens_per_second):>9} "
                     f"{timing.mfu:>6.1%} {timing.bubble_fraction:>6.1%}  "
                     f"{format_memory(worst, machine.kind == 'cpu')}")
    if report.ranked:
        lines.append(why_best(report))
    counts = report.refusal_counts()
    refused = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    lines.append(f"{len(report.ranked)} layouts fit; {len(report.refused)} refused"
                 + (f" ({refused})" if refused else ""))
    if not calibrated:
        lines.append("step times are nominal: this machine is not calibrated (run `ringpipe plan --calibrate` "
                     "with the same model flags), or pass --machine FILE")
    return "\n".join(lines)


def format_refusals(report) -> str:
    return "\n".join(f"  refused {c.label() if hasattr(c, 'label') else c}: {reason}" for c, reason in report.refused)


@click.command(short_help="Predict memory and step time of every layout; rank them.")
@click.option("--model", "family", type=click.Choice(list(INVENTORIES)), default="gpt2", show_default=True,
              help="Model family (those the planner has an inventory for: model/planning/family.py).")
@click.option("--n-layer", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--n-head", type=click.IntRange(min=1), default=12, show_default=True)
@click.option("--n-embd", type=click.IntRange(min=1), default=768, show_default=True)
@click.option("--n-inner", type=click.IntRange(min=1), default=None, help="MLP width (default 4 × n-embd).")
@click.option("--vocab", type=click.IntRange(min=1), default=50257, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Global batch (sequences).")
@click.option("--dropout", type=FiniteFloat(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Ranks to plan for.")
@click.option("--hosts", type=click.IntRange(min=1), default=1, show_default=True, help="Hosts the ranks spread over.")
@click.option("--machine", "machine_file", default=None,
              help="Machine JSON file (or a shipped name: a100-8x-node, h100-8x-node); default: this host.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--show-refused", is_flag=True, help="List every refused layout and why.")
@click.option("--json", "json_path", type=OutputFile(), default=None, help="Also write the ranked layouts as JSON to FILE.")
@click.option("--calibrate", is_flag=True,
              help="Time this machine for this model (up to --nproc workers) and store the machine file "
                   "(--out, default $RINGPIPE_MACHINE or the ringpipe cache).")
@click.option("--out", "machine_out", type=OutputFile(), default=None, help="Where --calibrate writes the machine file.")
def plan(family, n_layer, n_head, n_embd, n_inner, vocab, block_size, batch_size, dropout, dtype, nproc, hosts,
         machine_file, top, show_refused, json_path, calibrate, machine_out):
    """Predict memory per rank and step time of every layout of a model on --nproc ranks, and rank them."""
    from ringpipe.model.families import family as family_of
    from ringpipe.model.nn.mixed_precision import check_supported, model_dtype
    from ringpipe.model.planning.family import inventory_for
    from ringpipe.model.planning.machine import default_machine_path, load_machine, this_machine
    from ringpipe.model.planning.search import plan_layouts
    from ringpipe.runtime.files import write_json

    try:
        check_supported(dtype)  # as train refuses it
        # the family's default options (T5's feed-forward, position buckets...) with the flags' sizes
        options = dataclasses.replace(family_of(family).default_options(), n_layer=n_layer, n_head=n_head,
                                      n_embd=n_embd, n_inner=n_inner, block_size=block_size, dropout=dropout)
        config = family_of(family).config(**dataclasses.asdict(options), vocab_size=vocab, dtype=model_dtype(dtype))
        inventory = inventory_for(family, config)
        if calibrate:
            from ringpipe.tools.plan_calibration import calibrate as run_calibration

            from ringpipe.model.planning.search import candidates

            ranks = nproc or 2
            # the micro-batch row counts the layouts of --nproc ranks would run
            rows = sorted({batch_size // (c.dp * c.microbatches) for c, reason in
                           candidates(inventory, ranks, batch_size) if reason is None})
            groups = [k for k in range(2, ranks + 1) if ranks % k == 0]
            machine = run_calibration(inventory, rows, groups, progress=click.echo)
            path = machine_out or default_machine_path()
            write_json(path, machine.to_dict())
            click.echo(f"wrote {path}")
            return
        if nproc is None:
            raise click.UsageError("--nproc is required (the number of ranks to plan for)")
        if nproc % hosts:  # launchers put the same number of ranks on every host
            raise bad_flag("--hosts", f"{hosts} hosts cannot share --nproc {nproc} ranks evenly")
        machine = load_machine(machine_file) if machine_file else this_machine()
        machine.hosts = hosts
        report = plan_layouts(inventory, nproc, batch_size, machine, hosts)
    except ValueError as exc:  # a model, machine file or rank count the flags name that cannot work
        raise usage_error(str(exc)) from None
    calibrated = machine_file is not None or bool(machine.calibration)
    if not report.ranked:
        need = report.smallest_need()
        message = f"no layout of this model fits {nproc} ranks of {machine.name}"
        if need is not None:
            message += (f": the smallest per-rank memory it would need is {size(need[0])} ({need[1].label()}), "
                        f"the limit is {size(report.memory_limit)}")
        else:
            reasons = sorted({reason for _, reason in report.refused})
            message += ": " + "; ".join(reasons[:REASONS_SHOWN]) + (
                f"; and {len(reasons) - REASONS_SHOWN} more reasons (--show-refused lists every layout and why)"
                if len(reasons) > REASONS_SHOWN else "")
        if show_refused:
            click.echo(format_refusals(report))
        raise click.ClickException(message)
    click.echo(format_plan(report, top, machine, calibrated))
    if show_refused and report.refused:
        click.echo(format_refusals(report))
    if json_path:
        write_json(json_path, {"machine": machine.name, "layouts": [
            {"layout": c.__dict__, "label": c.label(), "memory": [m.as_dict() for m in memory],
             "timing": timing.as_dict()} for c, memory, timing in report.ranked[:top]],
            "refused": [{"layout": getattr(c, "__dict__", str(c)), "reason": reason} for c, reason in report.refused]})

"""`ringpipe train`'s flags as the run's TrainConfig: a fresh run's, or on --resume the checkpoint's
with the flags that may change (RESUME_OVERRIDABLE); and a resumed run that is already complete."""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import bad_flag
from ringpipe.model.families import FAMILIES
from ringpipe.model.training.config import TrainConfig, model_options
from ringpipe.model.training.run_dir import saved_config, saved_step

# Flags that may change when a run is resumed; every other flag must match the checkpoint.
# --microbatches too, as Megatron-LM and DeepSpeed allow a new gradient-accumulation count: the global
# batch (--batch-size, which cannot change) and so each step's gradient, the mean over its sequences,
# stay the same; only the rounding of the sum differs. Dropout: each micro-batch draws its masks from
# (seed, step, micro-batch index) (model/training/step.py), so after such a resume the masks differ
# from the ones an uninterrupted run would draw (the same distribution, other bits). We keep that
# rather than draw masks per sequence, which would tie every dropout site of every family to row
# indices; `config_from_flags` says so when it happens.
# --data may name the run's corpus where it is now (a moved or copied file): the run stores it as an
# absolute path, so a resume finds it from any directory, and a resume refuses a corpus whose tokens
# differ from the run's token file (model/training/run_setup.py), as it refuses the flags below.
RESUME_OVERRIDABLE = ("data", "steps", "eval_every", "eval_iters", "checkpoint_every", "device", "on_nonfinite",
                      "microbatches")
OPTIONS_OF_ANY_FAMILY = {option for model in FAMILIES for option in model_options(model)}


def _flag_of(ctx: click.Context, name: str) -> str:
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def config_from_flags(ctx: click.Context, flags: dict) -> TrainConfig:
    """The run's TrainConfig: from the flags, or from the checkpoint (with allowed overrides). A
    flag of another family, or one --resume cannot change, is a usage error naming it; a checkpoint
    whose record cannot be read a ValueError."""
    saved = saved_config(flags["out"]).flat() if flags["resume"] else None
    if flags["data"] is not None:
        flags = dict(flags, data=os.path.abspath(flags["data"]))
    model = saved["family"] if saved else flags["family"]
    names = TrainConfig(family=model).flat()  # the family's options and the run's, as the flags name them
    for name in flags:
        if name in OPTIONS_OF_ANY_FAMILY and name not in names and \
                ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise bad_flag(_flag_of(ctx, name), f"is not an option of --model {model}")
    chosen = {name: value for name, value in flags.items() if name in names}
    if not flags["resume"]:
        return TrainConfig(**chosen)
    for name, value in chosen.items():
        if ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            continue
        if name == "microbatches" and value != saved[name] and saved.get("dropout", 0) > 0:
            click.echo(f"note: --microbatches {value} (the run had {saved[name]}): dropout masks from here on "
                       "differ from the ones an uninterrupted run would draw", err=True)
        if name == "steps" and value != saved[name] and value > saved_step(flags["out"]):
            ctx.meta["resume_notes"] = [schedule_note(saved, value, saved_step(flags["out"]))]
        if name in RESUME_OVERRIDABLE:
            saved[name] = value
        elif value != saved[name]:
            raise bad_flag(_flag_of(ctx, name),
                           f"{value!r} differs from the checkpoint's {saved[name]!r};"
                           " it cannot change on --resume")
    return TrainConfig(**saved)


def schedule_note(saved: dict, steps: int, done: int) -> str:
    """A line saying that a new --steps recomputes the learning-rate schedule (its cosine decays to
    --min-lr at the new last step), and what the next step's rate is against the old schedule's. As
    Megatron-LM does with --override-opt_param-scheduler: a longer run is what a user extending one asks
    for (`train` prints it once the run has loaded, so a run refused on its data says nothing else)."""
    from ringpipe.model.nn.optim import lr_at

    rates = [lr_at(done, saved["lr"], saved["min_lr"], saved["warmup"], total) for total in (steps, saved["steps"])]
    return (f"note: --steps {steps} (the run had {saved['steps']}): the learning-rate schedule is recomputed "
            f"for {steps} steps; step {done + 1} trains at lr {rates[0]:.3g} ({rates[1]:.3g} on the old schedule)")


def already_complete(ctx: click.Context, config: TrainConfig, out: str) -> bool:
    """On --resume of a run whose checkpoint has reached --steps: say so (True), or refuse an
    explicit --steps below it; nothing is trained or re-saved."""
    done = saved_step(out)
    if done < config.steps:
        return False
    explicit = ctx.get_parameter_source("steps") == click.core.ParameterSource.COMMANDLINE
    if done > config.steps and explicit:
        raise bad_flag("--steps", f"{config.steps} is below the {done} steps the run in {out} has "
                                   f"completed; pass a larger --steps to train further")
    click.echo(f"the run in {out} is already complete at step {done} of {config.steps}; nothing to do. "
               f"To train further, pass --steps M with M > {done}, e.g. "
               f"ringpipe train --resume --out {out} --steps {2 * done}", err=True)
    return True

"""`ringpipe train`: flags, the training loop's driving, errors.

The loop itself lives in `model.training.trainer.Trainer` (one process) or `cluster.distributed_train.
DistributedRun` (workers); this module only drives it. What the user sees while it runs is
cluster/progress.py, the metrics.jsonl it writes cluster/metrics_log.py, restarts cluster/restarts.py; the
run's config from the flags (and what --resume may change) cluster/train_flags.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings

import click

from ringpipe.cluster.launchers import (check_multihost_flags, cluster_options, launcher_of, multihost_options,
                                        spmd_agent)
from ringpipe.cluster.memory_check import check_fits
from ringpipe.cluster.metrics_log import json_line, open_metrics
from ringpipe.cluster.options import (SEED, CommaList, FiniteFloat, OutputDirectory, bad_flag, check_device, one_line,
                                      out_of_memory, usage_error)
from ringpipe.cluster.plan_report import after_step, predict_run
from ringpipe.cluster.progress import Progress, checkpoint_status, report_interrupt, report_trace, status
from ringpipe.cluster.run_guard import exit_status, hold_run_dir, report_unfinished, terminate_like_interrupt
from ringpipe.cluster.restarts import check_restart_flags, restart_options, restartable, run_with_restarts
from ringpipe.cluster.train_flags import already_complete, config_from_flags
from ringpipe.model.data.dataset import corpus_files
from ringpipe.model.data.tokenizer import KINDS, encodable
from ringpipe.model.families import FAMILIES, family
from ringpipe.model.nn.mixed_precision import DTYPES
from ringpipe.model.training.parallel_trainer import Layout
from ringpipe.model.training.config import ON_NONFINITE, TrainConfig
from ringpipe.model.training.checkpoint_integrity import fallback_hint
from ringpipe.model.training.run_dir import find_checkpoint, remove_run, remove_traces
from ringpipe.model.training.step import OVERFLOW_WARNINGS, NonFiniteError
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime import ClusterStopped, RemoteError, WorkerLost
from ringpipe.runtime.array_module import to_host
from ringpipe.runtime.files import FileWriteError


def _worker_failure(exc: Exception, out: str, resumable: bool = True, summary: bool = True,
                    progress: Progress | None = None) -> click.ClickException:
    """One line for a worker that failed, died, went silent or got stuck, wherever the driver was
    (starting, training, evaluating, pulling weights for a checkpoint, writing traces): the cause's
    first line and, when a checkpoint exists, how to continue from it. With `summary`, the failure
    report (runtime/failure_report.py: the first failure, then the other ranks) goes before it."""
    report = getattr(exc, "report", None)
    if summary and report is not None:
        if progress is not None:
            progress.end_line()
        click.echo(report.text(), err=True)
    cause = exc.cause if isinstance(exc, ClusterStopped) else exc
    line = str(cause).splitlines()[0].rstrip(". ") if str(cause) else type(cause).__name__
    if out_of_memory(cause):  # the same run would run out again: neither advice applies
        resumable = False
    try:
        find_checkpoint(out)
    except ValueError:
        hint = "; no checkpoint was saved yet, so start the run again" if resumable else ""
    else:
        hint = f"; continue from the last checkpoint with --resume --out {out}" if resumable else ""
    return click.ClickException(line + hint)


def _with_fallback(line: str, flags: dict) -> str:
    """A failed resume's error line, and which older checkpoint is intact if it says the latest is damaged."""
    return line + (fallback_hint(flags["out"], line) if flags["resume"] else "")


D = TrainConfig()  # flag defaults are the config's defaults


@click.command(short_help="Train a model (GPT-2, BERT, T5); writes model, checkpoint, metrics.")
@click.option("--model", "family", type=click.Choice(list(FAMILIES)), default=D.family, show_default=True,
              help="The model family to train (model/families.py).")
@click.option("--data", default=None, help="Text FILE, DIR or GLOB (default: Python stdlib source).")
@click.option("--tokenizer", default=D.tokenizer, show_default=True,
              help="char, byte, bpe (a byte-level BPE trained on --data; needs --vocab-size) or "
                   "the path of a Hugging Face tokenizer directory.")
@click.option("--vocab-size", "bpe_vocab_size", type=click.IntRange(min=1), default=None,
              help="--tokenizer bpe: the vocabulary size to train (at most; 257 to 65536).")
@click.option("--n-layer", type=click.IntRange(min=1), default=D.model.n_layer, show_default=True)
@click.option("--n-head", type=click.IntRange(min=1), default=D.model.n_head, show_default=True)
@click.option("--n-embd", type=click.IntRange(min=1), default=D.model.n_embd, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=D.model.block_size, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=D.batch_size, show_default=True,
              help="Global batch, in sequences.")
@click.option("--microbatches", type=click.IntRange(min=1), default=D.microbatches, show_default=True,
              help="Gradient-accumulation steps the global batch is split into.")
@click.option("--steps", type=click.IntRange(min=1), default=D.steps, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0), default=D.lr, show_default=True)
@click.option("--min-lr", type=FiniteFloat(min=0), default=D.min_lr, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=D.warmup, show_default=True)
@click.option("--weight-decay", type=FiniteFloat(min=0), default=D.weight_decay, show_default=True)
@click.option("--beta2", type=FiniteFloat(0, 1, max_open=True), default=D.beta2, show_default=True)
@click.option("--grad-clip", type=FiniteFloat(min=0), default=D.grad_clip, show_default=True,
              help="Max global gradient norm; 0 disables clipping.")
@click.option("--dropout", type=FiniteFloat(0, 1, max_open=True), default=D.model.dropout, show_default=True)
@click.option("--next-sentence", is_flag=True,
              help="--model bert: sentence-pair rows and the next-sentence head too (BertForPreTraining).")
@click.option("--dtype", type=click.Choice(DTYPES), default=D.dtype,
              show_default=True, help="fp16-mixed: float16 compute, float32 master weights, dynamic loss scaling.")
@click.option("--loss-scale-growth-interval", type=click.IntRange(min=1), default=D.loss_scale_growth_interval,
              show_default=True, help="Mixed precision: good steps in a row before the loss scale doubles.")
@click.option("--seed", type=SEED, default=D.seed, show_default=True)
@click.option("--sampler", type=click.Choice(["epoch", "random"]), default=D.sampler, show_default=True,
              help="Train batches: shuffled epochs of back-to-back windows, or windows at random "
                   "offsets drawn with replacement.")
@click.option("--eval-every", type=click.IntRange(min=0), default=D.eval_every, show_default=True,
              help="Evaluate val loss every N steps (and after the last); 0: only after the last.")
@click.option("--eval-iters", type=click.IntRange(min=1), default=D.eval_iters, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=D.checkpoint_every,
              show_default=True, help="Checkpoint every N steps (and after the last).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True,
              help="Multi-worker runs: how many sharded checkpoints stay in --out/checkpoints (older ones "
                   "are deleted once a newer one is complete).")
@click.option("--on-nonfinite", type=click.Choice(ON_NONFINITE), default=D.on_nonfinite, show_default=True,
              help="A step whose loss or gradient norm is nan/inf: stop the run (before applying it), "
                   "or skip its update and go on.")
@click.option("--out", type=OutputDirectory(), default="out", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in --out.")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="After a worker fails, stop every worker and start them again (on the hosts still "
                   "reachable), resuming from the last checkpoint; at most N times. Needs --checkpoint-every.")
@click.option("--overwrite", is_flag=True, help="Start afresh even if --out holds an earlier run (it is replaced).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=D.device, show_default=True)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes; must equal dp × tp × pp.")
@click.option("--dp", type=click.IntRange(min=1), default=1, show_default=True, help="Data-parallel size.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor-parallel size.")
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True, help="Pipeline stages.")
@click.option("--schedule", type=click.Choice(["gpipe", "1f1b", "interleaved", "zb-h1"]), default="1f1b",
              show_default=True, help="Pipeline schedule.")
@click.option("--virtual-stages", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model chunks per pipeline rank (interleaved schedule).")
@click.option("--split", type=CommaList(click.IntRange(min=1)), default=None,
              help="Blocks per pipeline stage, e.g. 3,1 (default: balanced).")
@click.option("--encoder-stages", type=click.IntRange(min=1), default=None,
              help="--model t5: pipeline stages for the encoder's layers, the decoder's on the rest "
                   "(default: all layers balanced over the stages).")
@click.option("--sequence-parallel", is_flag=True, help="Shard LayerNorm/dropout regions along the sequence.")
@click.option("--zero", type=click.IntRange(0, 1), default=0, show_default=True,
              help="1: shard AdamW state over data-parallel ranks (ZeRO-1).")
@click.option("--bucket-mb", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="Data-parallel gradient bucket size in MiB.")
@multihost_options
@click.option("--trace", is_flag=True, help="Record every rank's spans into --out (see `ringpipe trace`).")
@click.option("--sample", type=click.IntRange(min=0), default=0, show_default=True,
              help="At the end, print a sample of this many generated tokens.")
@click.option("--no-memory-check", is_flag=True,
              help="Train even if the planned memory exceeds what this host has available (e.g. with swap).")
@click.pass_context
def train(ctx, **flags):
    """Train a model of the --model family on a text corpus; writes the model, a checkpoint and
    metrics.jsonl to --out."""
    out = flags["out"]
    flags["launcher"] = launcher_of(flags)
    code = spmd_agent(flags)  # under mpirun or srun every rank but 0 only runs its worker
    if code is not None:
        raise click.exceptions.Exit(code)
    warnings.filterwarnings("ignore", OVERFLOW_WARNINGS, RuntimeWarning)
    if flags["overwrite"] and flags["resume"]:
        raise bad_flag("--overwrite", "cannot be combined with --resume")
    if not flags["resume"]:
        try:
            find_checkpoint(out)
        except ValueError:
            pass
        else:
            if not flags["overwrite"]:
                raise bad_flag("--out", f"{out} already holds a checkpoint; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another directory")
            hold_run_dir(ctx, out)  # before deleting: the run it replaces may still be training
            remove_run(out)
    layout = Layout(dp=flags["dp"], tp=flags["tp"], pp=flags["pp"], schedule=flags["schedule"],
                    virtual_stages=flags["virtual_stages"], sequence_parallel=flags["sequence_parallel"],
                    zero=flags["zero"], split=flags["split"])
    distributed = flags["nproc"] > 1 or layout.world_size > 1 or flags["trace"] or flags["launcher"] != "local" \
        or flags["max_restarts"] > 0  # a restart starts worker processes again
    # Flags that would do nothing in this layout are refused, not silently dropped.
    if flags["sequence_parallel"] and layout.tp == 1:
        raise bad_flag("--sequence-parallel", "needs --tp 2 or more (it shards along the sequence the "
                        "activations tensor parallelism would otherwise replicate)")
    if flags["zero"] and layout.dp == 1:
        raise bad_flag("--zero", f"{flags['zero']} needs --dp 2 or more (ZeRO-1 shards the optimizer "
                        "state over data-parallel ranks)")
    if layout.pp == 1:
        given = ctx.get_parameter_source("schedule") == click.core.ParameterSource.COMMANDLINE
        for flag, used in (("--schedule", given), ("--virtual-stages", flags["virtual_stages"] != 1),
                           ("--split", flags["split"] is not None)):
            if used:
                raise bad_flag(flag, "needs --pp 2 or more (it places blocks on pipeline stages)")
    if not distributed and ctx.get_parameter_source("keep_checkpoints") == click.core.ParameterSource.COMMANDLINE:
        raise bad_flag("--keep-checkpoints", "needs a multi-worker run (--nproc 2 or more); a single process keeps "
                       "one checkpoint")
    if flags["launcher"] != "local":  # (the other hosts' workers need CuPy for --device gpu, not this driver)
        check_multihost_flags(ctx, flags, layout.world_size, layout.tp)
    else:
        check_device(flags["device"])
    if flags["launcher"] == "local" and flags["nproc"] != layout.world_size:
        raise bad_flag("--nproc", f"{flags['nproc']} must equal dp {layout.dp} × tp {layout.tp} × pp {layout.pp} "
                        f"= {layout.world_size} (give --dp, --tp or --pp to lay out {flags['nproc']} workers)")
    if not flags["resume"] and flags["tokenizer"] not in KINDS and not os.path.isdir(flags["tokenizer"]):
        raise bad_flag("--tokenizer", f"{flags['tokenizer']!r} is neither {', '.join(KINDS)} nor a "
                       "Hugging Face tokenizer directory")
    if flags["resume"]:
        try:
            find_checkpoint(out)
        except ValueError as exc:  # nothing to resume there: the flag is wrong (a damaged one is found below)
            raise bad_flag("--out", one_line(exc)) from None
    try:
        config = config_from_flags(ctx, flags)
    except (ValueError, RuntimeError) as exc:  # the checkpoint's record could not be read
        raise click.ClickException(_with_fallback(one_line(exc), flags)) from None
    try:  # before the first status line: a setting or layout that cannot work is the only output
        if flags["sample"] and not hasattr(family(config.family).model, "generate"):
            raise bad_flag("--sample", f"needs a model that generates text; a {config.family} model does not")
        config.validate()
        corpus_files(config.data)  # --data names files (what they hold is read later)
        check_restart_flags(flags, config, layout.world_size, distributed)
        if flags["encoder_stages"] is not None:
            layout.split = _encoder_decoder_split(flags, config, layout)
        if distributed:
            layout.validate(config)
    except ValueError as exc:  # what the flags ask for cannot work: a usage error (exit 2)
        raise usage_error(one_line(exc)) from None
    if flags["resume"] and already_complete(ctx, config, out):  # (its record was read above)
        return
    if not flags["no_memory_check"] and flags["launcher"] == "local":  # other hosts' memory is not known here
        _prepare_kernels()  # the planner asks which attention kernel runs: a build is said, not silent
        check_fits(config, layout, layout.world_size if distributed else 1, _sizing_flags(config))
    state = {"trainer": None, "progress": None}
    hold_run_dir(ctx, out)
    terminate_like_interrupt(ctx)
    try:
        run_with_restarts(lambda restart: _run(flags, config, layout, distributed, out, state, restart),
                          flags, layout, out, state)
    except KeyboardInterrupt as exc:
        report_interrupt(out, config, state)
        raise click.exceptions.Exit(exit_status(exc)) from None


def _sizing_flags(config) -> str:
    """The flags that size a run's memory, with their values: '--n-layer 4 ... --batch-size 12'."""
    model = dataclasses.asdict(config.model)
    names = [name for name in ("n_layer", "n_head", "n_embd", "n_inner", "block_size") if model.get(name)]
    return " ".join([f"--{name.replace('_', '-')} {model[name]}" for name in names]
                    + [f"--batch-size {config.batch_size}"])


def _encoder_decoder_split(flags, config, layout) -> list[int]:
    """--encoder-stages as the layers per pipeline stage (an encoder-decoder's only)."""
    stages = flags["encoder_stages"]
    if not hasattr(config.model, "pipeline_layers"):
        raise bad_flag("--encoder-stages", f"applies to an encoder-decoder (--model t5), not {config.family}")
    if layout.pp == 1 or flags["split"] is not None:
        raise bad_flag("--encoder-stages", "needs --pp 2 or more and no --split (it makes the split)")
    from ringpipe.model.t5.family import encoder_decoder_split
    try:
        return encoder_decoder_split(config.model, layout.pp * layout.virtual_stages, stages)
    except ValueError as exc:
        raise bad_flag("--encoder-stages", str(exc).replace(f"--encoder-stages {stages} ", "")) from None


def _run(flags, config, layout, distributed, out, state, restart=0):
    """Start the trainer (saying what takes time), train, report the trace, print the sample.
    `restart`: how often the job was restarted before (cluster/restarts.py)."""
    if flags["trace"]:
        remove_traces(out)  # an earlier run's ranks must not mix into this run's trace
    _prepare_kernels()
    report_unfinished(out)
    try:
        say = status
        say(("loading the checkpoint in " + out + " and tokenizing " if flags["resume"] else "tokenizing ")
            + (config.data or "the Python standard library source"))
        if distributed:
            from ringpipe.cluster.distributed_train import DistributedRun

            options = dict(cluster_options(flags, layout, out, say), **restart_options(restart))
            try:
                trainer = DistributedRun(config, layout, out, resume=flags["resume"], trace=flags["trace"],
                                         bucket_bytes=int(flags["bucket_mb"] * (1 << 20)), say=say,
                                         cluster_options=options, keep_checkpoints=flags["keep_checkpoints"],
                                         report=lambda line: click.echo(line, err=True))
            except BaseException:
                if options.get("launcher") is not None:
                    options["launcher"].close()  # the other hosts' agents end too
                raise
        else:
            trainer = (Trainer.resume if flags["resume"] else Trainer.create)(config, out)
    except WorkerLost as exc:
        raise restartable(exc, _worker_failure(exc, out)) from None
    except RemoteError as exc:  # a worker rejected the run while starting: resuming would not help
        raise click.ClickException(_with_fallback(
            _worker_failure(exc, out, resumable=False, summary=False).message, flags)) from None
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(_with_fallback(one_line(exc), flags)) from None
    state["trainer"] = trainer
    for note in click.get_current_context().meta.pop("resume_notes", ()):  # once, not again on a restart
        click.echo(note, err=True)
    state["prediction"] = predict_run(config, layout, trainer.tokenizer.vocab_size)
    finished, sample = False, None
    # From here on a worker may fail wherever the driver is: in a call, between calls, or while it
    # evaluates, writes a checkpoint or traces on its own. Each gives the same one-line error.
    try:
        try:
            _train_loop(trainer, config, out, state)
            finished = True
            if flags["sample"] and distributed:  # generated by the workers, before they stop
                status(f"generating a {flags['sample']}-token sample")
                try:
                    sample = trainer.sample(flags["sample"])
                except RuntimeError as exc:
                    raise click.ClickException(one_line(exc)) from None
        finally:
            if distributed:
                if finished and flags["trace"]:
                    status(f"collecting the traces of {layout.world_size} workers")
                trace_files = trainer.close()
                if trace_files and finished:
                    report_trace(out)
        if flags["sample"]:
            if distributed:
                click.echo(sample)
            else:
                status(f"generating a {flags['sample']}-token sample")
                tokenizer = trainer.tokenizer
                prompt = tokenizer.encode("\n") if encodable(tokenizer, "\n") else [0]
                ids = trainer.gpt.generate(trainer.gpt.xp.asarray(prompt)[None, :], flags["sample"], seed=config.seed)
                # an encoder-decoder's output is the decoder's, after its start token
                start = 1 if getattr(trainer.gpt, "is_encoder_decoder", False) else 0
                click.echo(tokenizer.decode(to_host(ids)[0, start:]))
    except (NonFiniteError, FileWriteError) as exc:
        raise click.ClickException(f"{exc}; {checkpoint_status(out)}") from None
    except (RemoteError, WorkerLost) as exc:
        raise restartable(exc, _worker_failure(exc, out, progress=state.get("progress"))) from None


def _prepare_kernels() -> None:
    """Compile the C kernels here, saying so, before the workers start (they then load the build)."""
    from ringpipe.model.nn import kernels

    if kernels.enabled and not kernels.is_built():
        status("compiling the C kernels (once per machine and source version)")
    kernels.library()


def _train_loop(trainer, config, out, state):
    """Steps, periodic evaluation and checkpoints, metrics.jsonl and progress; the final model."""
    first_step = trainer.step
    progress = state["progress"] = Progress(first_step, config.steps, sys.stderr)
    with open_metrics(out, first_step) as metrics_log:
        for step in range(first_step, config.steps):
            metrics = trainer.train_step(step)
            metrics["step"] = step + 1  # step numbers count from 1, as the progress line shows
            if state.get("restart"):  # a restarted run's rows say so; its first also why and whence
                metrics.update(restart=state["restart"], **state.pop("restart_row", {}))
            last = step + 1 == config.steps
            if last or (config.eval_every and (step + 1) % config.eval_every == 0):
                metrics.update(trainer.evaluate())
            metrics_log.write(json_line(metrics))
            metrics_log.flush()
            progress.update(metrics)
            after_step(state.get("prediction"), metrics, trainer, step + 1 - first_step, last, progress)
            if not last and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                trainer.save_checkpoint()
    progress.end_line()
    trainer.save_checkpoint()
    trainer.save_model()
    click.echo(f"saved model and checkpoint to {out}", err=True)



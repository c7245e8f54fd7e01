"""`ringpipe train` and `ringpipe generate`: flags, progress on stderr, metrics.jsonl, errors.

The loop itself lives in `model.train.Trainer`; this module only drives it and talks to the user.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings

import click

from cluster.cli import main
from cluster.options import FiniteFloat, OutputDirectory
from model.gpt import GPT
from model.tokenizer import TOKENIZER_FILES, load_tokenizer
from model.train import (CHECKPOINT_DIR, ON_NONFINITE, OVERFLOW_WARNINGS, TRAINER_STATE_FILE, NonFiniteError,
                         Trainer, TrainConfig, find_checkpoint, saved_config)
from model.parallel.trainer import Layout
from runtime import ClusterStopped, RemoteError, WorkerLost
from runtime.array_module import array_module, to_host
from runtime.files import AppendLog, FileWriteError, write_text


# Flags that may change when a run is resumed; every other flag must match the checkpoint.
RESUME_OVERRIDABLE = ("data", "steps", "eval_every", "eval_iters", "checkpoint_every", "device", "on_nonfinite")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _worker_failure(exc: Exception, out: str, resumable: bool = True) -> click.ClickException:
    """One line for a worker that failed, died, went silent or got stuck, wherever the driver was
    (starting, training, evaluating, pulling weights for a checkpoint, writing traces): the cause's
    first line and, when a checkpoint exists, how to continue from it."""
    cause = exc.cause if isinstance(exc, ClusterStopped) else exc
    line = str(cause).splitlines()[0].rstrip(". ") if str(cause) else type(cause).__name__
    try:
        find_checkpoint(out)
    except ValueError:
        hint = "; no checkpoint was saved yet, so start the run again" if resumable else ""
    else:
        hint = f"; continue from the last checkpoint with --resume --out {out}" if resumable else ""
    return click.ClickException(line + hint)


def _bad_flag(flag: str, message: str) -> click.ClickException:
    # ClickException, not BadParameter: one "Error: ..." line without the usage block.
    return click.ClickException(f"Invalid value for {flag}: {message}")


class Progress:
    """Step, loss, tokens/s and ETA on stderr: one redrawn line on a TTY, plain lines otherwise."""

    def __init__(self, first_step: int, total_steps: int, stream):
        self.first_step, self.total_steps, self.stream = first_step, total_steps, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.plain_every = max(1, (total_steps - first_step) // 20)

    def update(self, metrics: dict) -> None:
        step = metrics["step"]
        done = step + 1 - self.first_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total_steps - step - 1)
        # tokens/s averaged over the session: one step's rate jitters too much to read
        line = (f"step {step + 1}/{self.total_steps} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {metrics['tokens'] * done / elapsed:,.0f} tok/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if "val_loss" in metrics:
            line += f" val_loss {metrics['val_loss']:.4f}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if "val_loss" in metrics or step + 1 == self.total_steps:
                self.stream.write("\n")
        elif "val_loss" in metrics or done % self.plain_every == 0 or step + 1 == self.total_steps:
            self.stream.write(line + "\n")
        self.stream.flush()


def _config_from_flags(ctx: click.Context, flags: dict):
    """The run's TrainConfig: from the flags, or from the checkpoint (with allowed overrides)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    chosen = {name: value for name, value in flags.items() if name in fields}
    if not flags["resume"]:
        return TrainConfig(**chosen)
    config = saved_config(flags["out"])
    for name, value in chosen.items():
        if ctx.get_parameter_source(name) != click.core.ParameterSource.COMMANDLINE:
            continue
        if name in RESUME_OVERRIDABLE:
            setattr(config, name, value)
        elif value != getattr(config, name):
            raise _bad_flag("--" + name.replace("_", "-"),
                            f"{value!r} differs from the checkpoint's {getattr(config, name)!r};"
                            " it cannot change on --resume")
    return config


def _metrics_file(out: str, first_step: int):
    """metrics.jsonl opened for appending; on resume, lines of steps not kept are dropped."""
    path = os.path.join(out, "metrics.jsonl")
    kept = []
    if first_step > 0 and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] < first_step]
    write_text(path, "".join(kept))
    return AppendLog(path)


D = TrainConfig()  # flag defaults are the config's defaults


@main.command()
@click.option("--data", default=None, help="Text FILE, DIR or GLOB (default: Python stdlib source).")
@click.option("--tokenizer", type=click.Choice(["char", "byte"]), default=D.tokenizer, show_default=True)
@click.option("--n-layer", type=click.IntRange(min=1), default=D.n_layer, show_default=True)
@click.option("--n-head", type=click.IntRange(min=1), default=D.n_head, show_default=True)
@click.option("--n-embd", type=click.IntRange(min=1), default=D.n_embd, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=D.block_size, show_default=True)
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
@click.option("--dropout", type=FiniteFloat(0, 1, max_open=True), default=D.dropout, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64", "fp16-mixed", "bf16-mixed"]), default=D.dtype,
              show_default=True, help="fp16-mixed: float16 compute, float32 master weights, dynamic loss scaling.")
@click.option("--loss-scale-growth-interval", type=click.IntRange(min=1), default=D.loss_scale_growth_interval,
              show_default=True, help="Mixed precision: good steps in a row before the loss scale doubles.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--sampler", type=click.Choice(["epoch", "random"]), default=D.sampler, show_default=True,
              help="Train batches: shuffled epochs of back-to-back windows, or windows at random "
                   "offsets drawn with replacement.")
@click.option("--eval-every", type=click.IntRange(min=0), default=D.eval_every, show_default=True,
              help="Evaluate val loss every N steps (and after the last); 0: only after the last.")
@click.option("--eval-iters", type=click.IntRange(min=1), default=D.eval_iters, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=D.checkpoint_every,
              show_default=True, help="Checkpoint every N steps (and after the last).")
@click.option("--on-nonfinite", type=click.Choice(ON_NONFINITE), default=D.on_nonfinite, show_default=True,
              help="A step whose loss or gradient norm is nan/inf: stop the run (before applying it), "
                   "or skip its update and go on.")
@click.option("--out", type=OutputDirectory(), default="out", show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in --out.")
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
@click.option("--split", default=None, help="Blocks per pipeline stage, e.g. 3,1 (default: balanced).")
@click.option("--sequence-parallel", is_flag=True, help="Shard LayerNorm/dropout regions along the sequence.")
@click.option("--zero", type=click.IntRange(0, 1), default=0, show_default=True,
              help="1: shard AdamW state over data-parallel ranks (ZeRO-1).")
@click.option("--bucket-mb", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="Data-parallel gradient bucket size in MiB.")
@click.option("--trace", is_flag=True, help="Record every rank's spans into --out (see `ringpipe trace`).")
@click.option("--sample", type=click.IntRange(min=0), default=0, show_default=True,
              help="At the end, print a sample of this many generated tokens.")
@click.pass_context
def train(ctx, **flags):
    """Train a GPT on a text corpus; writes the model, a checkpoint and metrics.jsonl to --out."""
    out = flags["out"]
    warnings.filterwarnings("ignore", OVERFLOW_WARNINGS, RuntimeWarning)
    if flags["overwrite"] and flags["resume"]:
        raise _bad_flag("--overwrite", "cannot be combined with --resume")
    if not flags["resume"]:
        try:
            find_checkpoint(out)
        except ValueError:
            pass
        else:
            if not flags["overwrite"]:
                raise _bad_flag("--out", f"{out} already holds a checkpoint; pass --resume to continue it, "
                                "--overwrite to replace it, or choose another directory")
            _remove_run(out)
    try:
        split = [int(part) for part in flags["split"].split(",")] if flags["split"] else None
    except ValueError:
        raise _bad_flag("--split", f"{flags['split']!r} is not a comma-separated list of block counts") from None
    layout = Layout(dp=flags["dp"], tp=flags["tp"], pp=flags["pp"], schedule=flags["schedule"],
                    virtual_stages=flags["virtual_stages"], sequence_parallel=flags["sequence_parallel"],
                    zero=flags["zero"], split=split)
    distributed = flags["nproc"] > 1 or layout.world_size > 1 or flags["trace"]
    if flags["nproc"] != layout.world_size:
        raise _bad_flag("--nproc", f"{flags['nproc']} workers cannot hold dp {layout.dp} × tp {layout.tp} × "
                        f"pp {layout.pp} = {layout.world_size} ranks")
    try:
        config = _config_from_flags(ctx, flags)
        if distributed:
            from cluster.distributed_train import DistributedRun

            trainer = DistributedRun(config, layout, out, resume=flags["resume"], trace=flags["trace"],
                                     bucket_bytes=int(flags["bucket_mb"] * (1 << 20)))
        else:
            trainer = (Trainer.resume if flags["resume"] else Trainer.create)(config, out)
    except WorkerLost as exc:
        raise _worker_failure(exc, out) from None
    except RemoteError as exc:  # a worker rejected the run while starting: resuming would not help
        raise _worker_failure(exc, out, resumable=False) from None
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    # From here on a worker may fail wherever the driver is: in a call, between calls, or while it
    # evaluates, writes a checkpoint or traces on its own. Each gives the same one-line error.
    try:
        try:
            _train_loop(trainer, config, out)
        finally:
            if distributed:
                trace_files = trainer.close()
                if trace_files:
                    _report_trace(out)
        if flags["sample"]:
            tokenizer = trainer.tokenizer
            prompt = tokenizer.encode("\n") if _encodable(tokenizer, "\n") else [0]
            ids = trainer.gpt.generate(trainer.gpt.xp.asarray(prompt)[None, :], flags["sample"], seed=config.seed)
            click.echo(tokenizer.decode(to_host(ids)[0]))
    except (NonFiniteError, FileWriteError) as exc:
        raise click.ClickException(f"{exc}; {_checkpoint_status(out)}") from None
    except (RemoteError, WorkerLost) as exc:
        raise _worker_failure(exc, out) from None


def _checkpoint_status(out: str) -> str:
    try:
        checkpoint = find_checkpoint(out)
        with open(os.path.join(checkpoint, TRAINER_STATE_FILE)) as f:
            step = json.load(f)["step"]
    except (ValueError, OSError, KeyError):
        return "no checkpoint was written yet"
    return f"the checkpoint of step {step} in {checkpoint} is intact (continue with --resume --out {out})"


def _remove_run(out: str) -> None:
    """Delete what an earlier run wrote into `out` (only ringpipe's own files)."""
    import glob
    import shutil

    for pattern in ("checkpoint", "checkpoint.old", "checkpoint.tmp-*", "model.tmp-*"):
        for path in glob.glob(os.path.join(out, pattern)):
            shutil.rmtree(path, ignore_errors=True)
    for pattern in ("metrics.jsonl", "tokens.bin", "model.safetensors", "config.json", *TOKENIZER_FILES,
                    "trace-rank*.json", "clocks.json", "schedule.json", "trace.html"):
        for path in glob.glob(os.path.join(out, pattern)):
            os.remove(path)


def _encodable(tokenizer, text) -> bool:
    try:
        tokenizer.encode(text)
        return True
    except ValueError:
        return False


def _report_trace(out):
    """The trace summary and the path of the viewer page, when the trace tools are present."""
    try:
        from tools.trace_summary import format_summary, summarize
        from tools.trace_io import load_trace
        from tools.trace_view import write_view
    except ImportError:
        click.echo(f"traces written to {out}", err=True)
        return
    trace = load_trace(out)
    click.echo(format_summary(summarize(trace)), err=True)
    page = os.path.join(out, "trace.html")
    write_view(trace, page)
    click.echo(f"trace viewer: {page}", err=True)


def _train_loop(trainer, config, out):
    """Steps, periodic evaluation and checkpoints, metrics.jsonl and progress; the final model."""
    first_step = trainer.step
    progress = Progress(first_step, config.steps, sys.stderr)
    with _metrics_file(out, first_step) as metrics_log:
        try:
            for step in range(first_step, config.steps):
                metrics = trainer.train_step(step)
                last = step + 1 == config.steps
                if last or (config.eval_every and (step + 1) % config.eval_every == 0):
                    metrics.update(trainer.evaluate())
                metrics_log.write(json.dumps(metrics) + "\n")
                metrics_log.flush()
                progress.update(metrics)
                if not last and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                    trainer.save_checkpoint()
        except KeyboardInterrupt:
            raise click.ClickException(f"interrupted at step {trainer.step}; continue from the "
                                       f"last checkpoint with --resume --out {out}") from None
    trainer.save_checkpoint()
    trainer.save_model()
    click.echo(f"saved model and checkpoint to {out}", err=True)


@main.command()
@click.option("--checkpoint", "directory", required=True, type=click.Path(),
              help="A run directory (--out of train) or a model directory.")
@click.option("--prompt", default="\n", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True), default=1.0,
              show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
def generate(directory, prompt, max_new_tokens, temperature, top_k, seed, device):
    """Continue --prompt with a trained model and print the text."""
    if not os.path.isdir(directory):
        raise _bad_flag("--checkpoint", f"directory {directory!r} does not exist")
    if not os.path.exists(os.path.join(directory, "config.json")) and \
            os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
        directory = os.path.join(directory, CHECKPOINT_DIR)  # a run stopped before its end
    try:
        tokenizer = load_tokenizer(directory)
        gpt = GPT.from_pretrained(directory, device=device)
    except Exception as exc:  # any reader error means the same thing to the user
        raise click.ClickException(f"cannot load model from {directory}: {_one_line(exc)}") from None
    if not prompt:
        raise _bad_flag("--prompt", "must not be empty")
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as exc:
        raise _bad_flag("--prompt", _one_line(exc)) from None
    xp = array_module(device)
    out = gpt.generate(xp.asarray(ids)[None, :], max_new_tokens, temperature=temperature,
                       top_k=top_k, seed=seed)
    click.echo(tokenizer.decode(to_host(out)[0]))

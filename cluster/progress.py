"""What `ringpipe train` tells the user while and after it runs: the progress line, status lines
before slow stretches, the state of the checkpoint after an error or Ctrl-C, the trace report."""
from __future__ import annotations

import collections
import os
import time

import click

from ringpipe.model.training.run_dir import TRACE_VIEW_FILE, find_checkpoint, read_trainer_state, saved_step


class Progress:
    """Step, loss, tokens/s and ETA on stderr: one redrawn line on a TTY, plain lines otherwise
    (the session's first step, every 1/20 of the run, evaluations and the last step).

    Rate and ETA come from the last `window` steps, not counting the session's first step (it
    pays for warm-up: page faults, first allocations, the workers' first messages), so neither
    is skewed by it; until a second step has finished the ETA reads "-:--"."""

    def __init__(self, first_step: int, total_steps: int, stream, window: int = 20):
        self.first_step, self.total_steps, self.stream = first_step, total_steps, stream
        self.tty = stream.isatty()
        self.last = time.perf_counter()
        self.durations = collections.deque(maxlen=window)
        self.line_open = False  # a redrawn TTY line without its newline yet
        self.plain_every = max(1, (total_steps - first_step) // 20)

    def update(self, metrics: dict) -> None:
        step = metrics["step"]  # 1-based: the number of optimizer steps done
        done = step - self.first_step
        now = time.perf_counter()
        if done > 1:
            self.durations.append(now - self.last)
        self.last = now
        if self.durations:
            per_step = sum(self.durations) / len(self.durations)
            eta = int(per_step * (self.total_steps - step))
            rate = f"{metrics['tokens'] / per_step:,.0f} tok/s ETA {eta // 60}:{eta % 60:02d}"
        else:
            rate = "- tok/s ETA -:--"
        line = f"step {step}/{self.total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {rate}"
        if "val_loss" in metrics:
            line += f" val_loss {metrics['val_loss']:.4f}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.line_open = True
            if "val_loss" in metrics or step == self.total_steps:
                self.end_line()
        elif "val_loss" in metrics or done % self.plain_every == 0 or step == self.total_steps or done == 1:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """Finish a redrawn line, so that what is printed next starts on a line of its own."""
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False


def checkpoint_status(out: str) -> str:
    try:
        checkpoint = find_checkpoint(out)
        step = read_trainer_state(checkpoint)["step"]  # consolidated or sharded
    except (ValueError, OSError, KeyError):
        return "no checkpoint was written yet"
    return f"the checkpoint of step {step} in {checkpoint} is intact (continue with --resume --out {out})"


def status(message: str) -> None:
    """One line on stderr saying what the next silent stretch is doing."""
    click.echo(message + " ...", err=True)


def report_interrupt(out, config, state) -> None:
    """After Ctrl-C: where the run stopped and whether (and from which step) it can resume."""
    if state["progress"] is not None:
        state["progress"].end_line()
    trainer = state["trainer"]
    where = "while starting" if trainer is None else f"after step {trainer.step} of {config.steps}"
    try:
        saved = saved_step(out)
    except ValueError:
        saved = None
    if saved is None:
        click.echo(f"interrupted {where}; no checkpoint was written, so there is nothing to resume "
                   f"(checkpoints are written every {config.checkpoint_every} steps and at the end)"
                   if config.checkpoint_every else
                   f"interrupted {where}; no checkpoint was written, so there is nothing to resume "
                   f"(with --checkpoint-every 0 it is written only at the end)", err=True)
    elif saved >= config.steps:  # stopped while the trace report or the sample was being made
        click.echo(f"interrupted after the run completed: its model and checkpoint are in {out}", err=True)
    else:
        click.echo(f"interrupted {where}; the last checkpoint is at step {saved}: continue it with "
                   f"ringpipe train --resume --out {out}", err=True)


def report_trace(out):
    """The trace summary and the path of the viewer page, when the trace tools are present."""
    try:
        from ringpipe.tools.trace_summary import format_summary, summarize
        from ringpipe.tools.trace_io import bulk_allocation, load_trace, rank_files
        from ringpipe.tools.trace_view import write_view
    except ImportError:
        click.echo(f"traces written to {out}", err=True)
        return
    megabytes = sum(os.path.getsize(path) for path in rank_files(out).values()) / 1e6
    status(f"summarising the trace ({megabytes:.0f} MB from {len(rank_files(out))} ranks)")
    with bulk_allocation():
        trace = load_trace(out, counters=False)
        summary = summarize(trace)
        click.echo(format_summary(summary), err=True)
        page = os.path.join(out, TRACE_VIEW_FILE)
        status(f"writing the trace viewer ({len(trace.events):,} events)")
        write_view(trace, page, summary)
    click.echo(f"trace viewer: {page}", err=True)

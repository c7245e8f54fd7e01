"""What `ringpipe train` holds while it runs: its --out directory (one run at a time), SIGTERM
taken like Ctrl-C, and a word about the unfinished checkpoints a new start deletes."""
from __future__ import annotations

import os
import signal
import threading

import click

from ringpipe.cluster.options import bad_flag
from ringpipe.model.training.checkpoint_metadata import remove_unfinished
from ringpipe.model.training.run_dir import LOCK_FILE, lock_run_dir


class Terminated(KeyboardInterrupt):
    """SIGTERM to the driver: unwinds like Ctrl-C (workers stopped, the resume hint), exit 143."""


def hold_run_dir(ctx: click.Context, out: str) -> None:
    """Lock `out` for this command's life (released when its click context closes, or by the kernel
    when the process dies); a second run into it is one error line naming the holder. A directory
    made for the lock alone goes again if the run failed before writing anything into it."""
    if "run_lock" in ctx.meta:
        return
    created = not os.path.isdir(out)
    try:
        fd = lock_run_dir(out)
    except ValueError as exc:
        raise bad_flag("--out", str(exc)) from None
    ctx.meta["run_lock"] = fd

    def release():
        try:
            if created and os.listdir(out) == [LOCK_FILE]:
                os.remove(os.path.join(out, LOCK_FILE))
                os.rmdir(out)
        except OSError:
            pass  # only tidying: the lock itself goes with the descriptor
        os.close(fd)
    ctx.call_on_close(release)


def terminate_like_interrupt(ctx: click.Context) -> None:
    """Make SIGTERM raise Terminated in the main thread until this command ends (a batch system's
    stop or `kill` then says where the run stopped and how to resume it, as Ctrl-C does)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def report_unfinished(out: str) -> None:
    """Delete the sharded checkpoints whose save was cut short (no commit file), saying which."""
    for path in remove_unfinished(out):
        click.echo(f"removed the unfinished checkpoint {path} (its save was cut short; it has no "
                   "checkpoint.json)", err=True)

"""`ringpipe train --max-restarts N`: when a worker fails, stop every worker, start them all again and
resume from the latest committed checkpoint, as torchrun's elastic agent restarts a job.

    attempt 0        a worker dies, stops answering, gets stuck or raises in a step: every worker is
                     stopped (the cluster does that); the console shows the failure report, then
                     one line: which restart, after what, on which hosts, from which step
    before a restart the latest committed checkpoint must be whole (every piece, every checksum);
                     with --hostfile the hosts are checked again over ssh, those failing are left
                     out, and the others' slots must still hold dp × tp × pp workers. Otherwise one
                     line says why, and nothing restarts.
    attempt k        workers see TORCHELASTIC_RESTART_COUNT=k; the run resumes from that checkpoint
                     (a save the failure cut short is removed), or from step 0 if none was committed

Restarted are failures of the workers, not errors that would come back the same: a flag or config a
worker refuses at start-up, non-finite weights, a full disk. The data sampler's and the dropout's
state are the step and the seed, so on the same hosts the final weights equal an uninterrupted run's
to the bit; on other hosts the sums through shared memory and TCP may be ordered differently.
"""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import bad_flag, one_line, usage_error
from ringpipe.model.training.checkpoint_integrity import fallback_hint, verify_checkpoint
from ringpipe.model.training.checkpoint_metadata import is_sharded
from ringpipe.model.training.run_dir import find_checkpoint, read_trainer_state
from ringpipe.runtime.calls import ClusterStopped, RemoteError
from ringpipe.runtime.fault_injection import FAULT_VARIABLE, fault_from_environment

RESTARTING_LAUNCHERS = ("local", "ssh")  # those whose workers the driver starts, and can start again


class RestartableFailure(click.ClickException):
    """A worker failure a restart may get past: the one-line error if none is left; `cause` is the
    failure (WorkerLost, or the RemoteError of a step)."""

    def __init__(self, message: str, cause: Exception):
        super().__init__(message)
        self.cause = cause


# What a rank may raise that a restart would only meet again: its disk is full or not writable,
# its values are not finite, it ran out of memory (NumPy raises _ArrayMemoryError).
NOT_RESTARTED = ("FileWriteError", "NonFiniteError", "MemoryError", "_ArrayMemoryError")


def restartable(cause: Exception, error: click.ClickException) -> click.ClickException:
    """`error` as a RestartableFailure, unless `cause` is a rank's error in NOT_RESTARTED."""
    if isinstance(cause, RemoteError) and cause.exc_type in NOT_RESTARTED:
        return error
    return RestartableFailure(error.message, cause)


def check_restart_flags(flags: dict, config, world_size: int, distributed: bool) -> None:
    """One line, before anything starts, for --max-restarts that cannot work, or a RINGPIPE_FAULT
    that is malformed or could never fire in this run."""
    try:
        fault = fault_from_environment()
    except ValueError as exc:
        raise usage_error(one_line(exc)) from None
    problem = ""
    if fault is not None and not distributed:
        problem = "the run has no worker processes (give --nproc 2 or more, or --max-restarts)"
    elif fault is not None and fault.rank >= world_size:
        problem = f"rank {fault.rank} is not among the run's ranks 0..{world_size - 1}"
    elif fault is not None and fault.step > config.steps:
        problem = f"step {fault.step} is beyond --steps {config.steps}"
    if problem:
        raise usage_error(f"{FAULT_VARIABLE}={os.environ[FAULT_VARIABLE]!r} would never fire: {problem}")
    if not flags["max_restarts"]:
        return
    if not config.checkpoint_every:
        raise bad_flag("--max-restarts", "needs checkpoints to resume from: give --checkpoint-every N "
                                         "(with 0 the only checkpoint is written at the end)")
    if flags["launcher"] not in RESTARTING_LAUNCHERS:
        raise bad_flag("--max-restarts", f"restarts workers the driver starts itself (--nproc, --hostfile); "
                                         f"under --launcher {flags['launcher']} the agents end with the "
                                         "job: restart it with your launcher and --resume")


def restart_options(restart: int) -> dict:
    """The Cluster options of attempt `restart`: the count, and RINGPIPE_FAULT for agents on other
    hosts (local workers inherit the driver's environment)."""
    fault = os.environ.get(FAULT_VARIABLE)
    return {"restart_count": restart, **({"env": {FAULT_VARIABLE: fault}} if fault else {})}


def run_with_restarts(attempt, flags: dict, layout, out: str, state: dict):
    """`attempt(restart)` (start, train, stop the workers), again after each RestartableFailure
    while restarts are left; its result. Tells the console, and `state["restart_row"]` the first
    metrics row of each new attempt, what restarted and from which step."""
    restart = 0
    while True:
        state["restart"] = restart
        try:
            return attempt(restart)
        except RestartableFailure as failure:
            if restart >= flags["max_restarts"]:
                raise
            if state.get("progress") is not None:
                state["progress"].end_line()
            restart += 1
            cause = failure.cause.cause if isinstance(failure.cause, ClusterStopped) else failure.cause
            what = str(cause).splitlines()[0].rstrip(". ") if str(cause) else type(cause).__name__
            try:
                step, checkpoint = resume_point(out)
                hosts = remaining_hosts(flags, layout, out) if flags["launcher"] == "ssh" else ""
            except click.ClickException as refused:  # the failure, then why it cannot be restarted
                raise click.ClickException(f"{what}; {refused.message}") from None
            click.echo(f"restart {restart} of {flags['max_restarts']} (--max-restarts) after: {what}; starting "
                       f"every worker again{hosts}, resuming from "
                       + (f"step {step} (checkpoint {checkpoint})" if checkpoint else
                          "step 0 (no checkpoint was committed yet)"), err=True)
            state["restart_row"] = {"restart_cause": what, "resumed_from_step": step}
            flags["resume"] = checkpoint is not None


def resume_point(out: str) -> tuple[int, str | None]:
    """(step, path) of the checkpoint a restart resumes from, (0, None) if none was committed;
    ClickException (one line, naming the newest older checkpoint that is whole) if it is damaged:
    every piece of a sharded one is read against its checksum first."""
    try:
        latest = find_checkpoint(out)
    except ValueError:
        return 0, None
    try:
        if is_sharded(latest):  # a consolidated one's tensors are checked as they load
            verify_checkpoint(latest)
        return read_trainer_state(latest)["step"], latest
    except (ValueError, OSError, KeyError, TypeError) as exc:  # CorruptFileError is a ValueError
        error = f"the latest checkpoint {latest} is damaged ({one_line(exc)})"
        raise click.ClickException(f"not restarting: {error}"
                                   + fallback_hint(out, error, f"continue with --resume --out {out}")) from None


def remaining_hosts(flags: dict, layout, out: str) -> str:
    """With --hostfile: check every host again over ssh and leave out those that fail (in
    `flags["hosts_gone"]`, for the launcher); " on the remaining hosts ..." when some did.
    ClickException (one line) if the others cannot hold dp × tp × pp workers."""
    from ringpipe.cluster.hostfile import read_hostfile
    from ringpipe.cluster.ssh_launch import host_problems
    from ringpipe.runtime.placement import PlacementError, place_ranks

    entries = read_hostfile(flags["hostfile"])
    problems = host_problems([name for name, _ in entries], out)
    gone = [problem for problem in problems if problem]
    left = [(name, slots) for (name, slots), problem in zip(entries, problems) if not problem]
    flags["hosts_gone"] = [name for (name, _), problem in zip(entries, problems) if problem]
    try:
        place_ranks([slots for _, slots in left], layout.world_size, layout.tp)
    except PlacementError:
        held = ", ".join(f"{name} slots={slots}" for name, slots in left) or "none"
        raise click.ClickException(f"not restarting: the hosts left ({held}) cannot hold dp × tp × pp = "
                                   f"{layout.world_size} workers; {'; '.join(gone)}") from None
    if not gone:
        return ""
    return f" on the remaining hosts {', '.join(name for name, _ in left)} ({'; '.join(gone)})"

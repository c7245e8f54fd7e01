"""What the driver says when a job fails: the first failure (the root cause) and what it did to
the other ranks, in the spirit of torchrun's "Root Cause" summary.

`Cluster` builds a `FailureReport` for every failure a caller sees: a lost worker (`WorkerLost`:
died, silent, stuck; every worker is stopped) and a worker that raised (`RemoteError`). It is the
exception's `report`; `report.text()` is the summary a user reads, `report.root` and
`report.consequences` the records a program (a restart loop) acts on.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

from ringpipe.runtime.rank_logs import log_tail

TAIL_LINES = 10  # lines of a traceback and of a log in the summary


@dataclass
class RankOutcome:
    """What happened to one rank. `what` says it in a few words ("killed by signal SIGKILL",
    "exited with code 3", "raised ValueError: ...", "sent no heartbeat for 8.2s", "stopped by the
    driver with SIGTERM"); `exit_code` is the process's (negative: the signal), None while it runs
    or where unknown; `time` is when the driver saw it (seconds since the epoch); `traceback` and
    `log` are the last lines of the rank's traceback (or stack) and of its log file."""
    rank: int | None
    host: str
    pid: int | None
    what: str
    call: str | None = None
    doing: str = ""
    exit_code: int | None = None
    time: float = field(default_factory=time.time)
    traceback: str = ""
    log_path: str | None = None
    log: str = ""

    def headline(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "the driver"
        during = f" while running {self.call}" if self.call else ""
        doing = f"; it was {self.doing}" if self.doing else ""
        return f"{who} (host {self.host}, pid {self.pid}): {self.what}{during}{doing}"


@dataclass
class FailureReport:
    """The first failure of a job and its consequences on the other ranks, in rank order;
    `stopped`: every worker was stopped (a lost worker), or only the call was aborted (a worker raised)."""
    root: RankOutcome
    consequences: list[RankOutcome]
    stopped: bool = True

    def text(self) -> str:
        """The multi-line summary for the console."""
        root = self.root
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(root.time)) + f".{int(root.time * 1000) % 1000:03d} UTC"
        heading = ("the job failed; every worker is stopped" if self.stopped
                   else "a call failed on a worker; the other ranks' part of it was aborted")
        lines = ["=" * 72, f"ringpipe: {heading}",
                 f"Root cause (first failure) at {stamp}:", f"  {root.headline()}"]
        if root.exit_code is not None:
            lines.append(f"  exit code: {exit_text(root.exit_code)}")
        tail = _tail(root.traceback)
        if tail:
            lines += ["  traceback (last lines):"] + _indent(tail)
        else:
            lines.append("  traceback: none (" + ("the process ended without raising)" if root.exit_code is not None
                                                  else "it has not raised)"))
        if root.log_path:
            lines += [f"  log {root.log_path} (last lines):"] + (_indent(_tail(root.log)) or ["    (empty)"])
        if self.consequences:
            lines.append("Consequences on the other ranks:")
            lines += [f"  {outcome.headline()}" for outcome in self.consequences]
        lines.append("=" * 72)
        return "\n".join(lines)


def signal_name(signum: int) -> str:
    """"SIGKILL" for 9; "signal 99" for a number Python does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_text(code: int) -> str:
    """"3", or "-9 (SIGKILL)" for a process killed by a signal."""
    return f"{code} ({signal_name(-code)})" if code < 0 else str(code)


def how_it_ended(code: int) -> str:
    """A process's exit code in words: "was killed by signal SIGKILL", "exited with code 3"."""
    return f"was killed by signal {signal_name(-code)}" if code < 0 else f"exited with code {code}"


def _tail(text: str) -> str:
    lines = [line for line in (text or "").rstrip().splitlines()
             if not line.startswith("Traceback (most recent call last)")]
    return "\n".join(lines[-TAIL_LINES:])


def _indent(text: str) -> list[str]:
    return [f"    | {line}" for line in text.splitlines()] if text else []


def outcome(rank: int, launcher, log_paths: list, what: str, **details) -> RankOutcome:
    """A rank's outcome with its host, pid and log tail filled in from `launcher` and `log_paths`."""
    path = log_paths[rank] if rank is not None and rank < len(log_paths) else None
    host = launcher.host(rank) if rank is not None else "driver"
    pid = launcher.pid(rank) if rank is not None else None
    return RankOutcome(rank, host, pid, what, log_path=path, log=log_tail(path, TAIL_LINES), **details)


def report_lost_worker(lost, launcher, world_size: int, ended_before: dict, tracebacks: dict, doing,
                       log_paths: list, call_errors: dict, when: float) -> FailureReport:
    """The report of `lost` (a WorkerLost) once every worker was told to stop. `ended_before`:
    rank -> exit code before the driver stopped anyone (None: it was running); `doing(rank)`: what
    the rank was doing as far as the driver knows; `call_errors`: rank -> the error a rank
    returned for a call in flight."""
    rank = lost.rank
    code = ended_before.get(rank) if rank is not None else None
    root = outcome(rank, launcher, log_paths, getattr(lost, "reason", "") or str(lost).splitlines()[0],
                   call=lost.call, exit_code=code, time=when,
                   traceback=getattr(lost, "stack", "") or tracebacks.get(rank, ""))
    consequences = []
    for other in range(world_size):
        if other == rank:
            continue
        before, after = ended_before.get(other), launcher.poll(other)
        error = call_errors.get(other) or {}
        first_line = " ".join(str(error.get("error", "")).split())[:200]
        if before is not None:
            what = f"also {how_it_ended(before)} before the driver stopped the job"
        elif after is None:
            what = "not confirmed stopped" + (launcher.process_note(other) or " (no word from its host)")
        else:
            what = (f"stopped by the driver with {signal_name(-after)}" if after < 0
                    else f"stopped by the driver (it exited with code {after})")
        if first_line:
            what += f"; its call had failed: {first_line}"
        consequences.append(outcome(other, launcher, log_paths, what, exit_code=before if before is not None
                                    else after, doing=doing(other), traceback=tracebacks.get(other, "")))
    return FailureReport(root, consequences)


def report_remote_error(errors: dict, root_rank: int, call: str, launcher, log_paths: list) -> FailureReport:
    """The report of a call that raised on `root_rank`; `errors` holds every rank's error reply
    (with "seen", when the driver got it). The other ranks were aborted, not stopped."""
    def record(rank, value, what):
        return outcome(rank, launcher, log_paths, what, call=call, time=value.get("seen") or time.time(),
                       traceback=str(value.get("traceback", "")))

    first = errors[root_rank]
    root = record(root_rank, first, f"raised {' '.join(str(first.get('error', '')).split())[:300]}")
    consequences = [record(rank, value, ("aborted: " if value.get("aborted") else "failed: ")
                           + " ".join(str(value.get("error", "")).split())[:200])
                    for rank, value in sorted(errors.items()) if rank != root_rank]
    return FailureReport(root, consequences, stopped=False)


__all__ = ["RankOutcome", "FailureReport", "report_lost_worker", "report_remote_error", "how_it_ended", "exit_text"]

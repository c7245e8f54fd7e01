"""A deterministic fault injector, a testing aid for restarts and failure reports (as TorchFT's).

    RINGPIPE_FAULT="rank=1,step=7,kind=kill" ringpipe train --nproc 2 --dp 2 --max-restarts 1 ...

makes worker rank 1 fail as it starts step 7 (1-based, as the progress line and metrics.jsonl count
steps), and only in the job's first run (TORCHELASTIC_RESTART_COUNT 0), so a restarted run
completes. The kinds are the ways workers fail in real runs:

    kill         SIGKILL to itself (the OOM killer, a crash in native code)
    stop         SIGSTOP to itself (a hung or frozen process: only its heartbeats' absence tells)
    raise        an exception inside the step (a bug in the training code)
    exit         exit code 3 without a traceback (os._exit in some library)
    during-save  SIGKILL to itself right after writing its pieces of the first checkpoint saved
                 after step 7, before the driver commits that checkpoint

Never set it in a real run. The driver refuses a malformed value before anything starts.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

FAULT_VARIABLE = "RINGPIPE_FAULT"
RESTART_COUNT_VARIABLE = "TORCHELASTIC_RESTART_COUNT"
KINDS = ("kill", "stop", "raise", "exit", "during-save")
EXIT_CODE = 3


class InjectedFault(RuntimeError):
    """What kind=raise raises."""


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int  # 1-based: the step that fails, or (during-save) the first checkpoint after it
    kind: str

    @classmethod
    def parse(cls, text: str) -> "Fault":
        """`rank=R,step=S,kind=K`; ValueError naming the variable and what is wrong."""
        where = f"{FAULT_VARIABLE}={text!r}"
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, equals, value = part.partition("=")
            if not equals or name.strip() not in ("rank", "step", "kind"):
                raise ValueError(f"{where}: {part!r} is not rank=R, step=S or kind=K")
            fields[name.strip()] = value.strip()
        missing = [name for name in ("rank", "step", "kind") if name not in fields]
        if missing:
            raise ValueError(f"{where}: {', '.join(missing)} missing (expected rank=R,step=S,kind=K)")
        if fields["kind"] not in KINDS:
            raise ValueError(f"{where}: kind {fields['kind']!r} is not one of {', '.join(KINDS)}")
        try:
            rank, step = int(fields["rank"]), int(fields["step"])
        except ValueError:
            raise ValueError(f"{where}: rank and step must be integers") from None
        if rank < 0 or step < 1:
            raise ValueError(f"{where}: rank must be 0 or more and step 1 or more (steps count from 1)")
        return cls(rank, step, fields["kind"])


def fault_from_environment(environ=os.environ) -> Fault | None:
    """The fault RINGPIPE_FAULT asks for (None when unset or empty); ValueError if malformed."""
    text = environ.get(FAULT_VARIABLE, "").strip()
    return Fault.parse(text) if text else None


class FaultInjector:
    """The worker's side: armed on the rank the fault names, in the job's first run only."""

    def __init__(self, rank: int, environ=os.environ):
        fault = fault_from_environment(environ)
        first_run = int(environ.get(RESTART_COUNT_VARIABLE) or 0) == 0
        self.fault = fault if fault is not None and fault.rank == rank and first_run else None
        self.steps_begun = 0

    def before_step(self, step: int) -> None:
        """Called as step index `step` (0-based) begins."""
        self.steps_begun = step + 1
        fault = self.fault
        if fault is not None and fault.kind != "during-save" and fault.step == step + 1:
            self.fault = None
            _fail(fault)

    def after_writing_checkpoint(self) -> None:
        """Called once this rank's pieces of a checkpoint are written, before it reports them."""
        fault = self.fault
        if fault is not None and fault.kind == "during-save" and self.steps_begun >= fault.step:
            self.fault = None
            _fail(fault)


def _fail(fault: Fault) -> None:
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault ({FAULT_VARIABLE}) at step {fault.step} on rank {fault.rank}")
    if fault.kind == "exit":
        os._exit(EXIT_CODE)
    # SIGSTOP returns only once the process is continued (a test may do so); then it goes on.
    os.kill(os.getpid(), signal.SIGSTOP if fault.kind == "stop" else signal.SIGKILL)

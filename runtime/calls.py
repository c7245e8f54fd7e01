"""What a call on the cluster gives back: `CallFuture`, `ActorGroup`, and the errors a call raises
(`RemoteError` for a worker that raised; `WorkerLost` and its kinds for a worker that can no longer
take part).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref

from ringpipe.runtime.failure_report import how_it_ended


class RemoteError(RuntimeError):
    """A call raised on a worker; carries the rank and the remote traceback. `report` (a
    runtime.failure_report.FailureReport, set by the cluster) is that rank first, then what the
    others' part of the call ended with."""

    report = None

    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str, call: str):
        self.rank, self.exc_type, self.remote_traceback, self.call = rank, exc_type, remote_traceback, call
        super().__init__(f"rank {rank} raised {message} in {call}\n"
                         f"--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}")


class WorkerLost(RuntimeError):
    """A worker can no longer take part (died, silent or stuck): every worker has been stopped.

    `rank`, `pid`, `host` and `call` (the call it was running, or None) name it where known;
    `reason` says what happened in a few words; `report` (a runtime.failure_report.FailureReport,
    set once every worker was stopped) is the root cause and its consequences on the other ranks."""

    report = None

    def __init__(self, message: str, rank: int | None = None, pid: int | None = None, call: str | None = None,
                 host: str | None = None, reason: str = ""):
        self.rank, self.pid, self.call, self.host, self.reason = rank, pid, call, host, reason
        super().__init__(message)


def where(pid: int | None, host: str | None) -> str:
    """"(pid 123) on host h1" for messages naming a worker."""
    return f"(pid {pid})" + (f" on host {host}" if host else "")


class WorkerDied(WorkerLost):
    """A worker process ended while the cluster was running."""

    def __init__(self, rank: int, pid: int, returncode: int, remote_traceback: str, call: str | None,
                 host: str | None = None):
        self.returncode = returncode
        how = how_it_ended(returncode)
        during = f" while running {call}" if call else ""
        tb = (f"\n--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}" if remote_traceback
              else " (no traceback: the process ended without raising)")
        super().__init__(f"worker rank {rank} {where(pid, host)} {how}{during}; all workers stopped.{tb}", rank, pid,
                         call, host, reason=how)


class WorkerUnresponsive(WorkerLost, TimeoutError):
    """A worker sent nothing (not even a heartbeat) for too long: stopped, wedged, or its host gone."""


class WorkerStuck(WorkerLost):
    """A live worker made no progress in a call that the other ranks gave up on; `stack` is where
    its compute thread was."""

    def __init__(self, message: str, rank: int, pid: int, call: str | None, stack: str, host: str | None = None,
                 reason: str = ""):
        self.stack = stack
        super().__init__(message, rank, pid, call, host, reason)


class ClusterStopped(WorkerLost):
    """A call on a cluster that a lost worker stopped earlier; `cause` is that first failure."""

    def __init__(self, cause: Exception):
        self.cause = cause
        super().__init__(f"cluster is stopped: {str(cause).splitlines()[0]}", getattr(cause, "rank", None),
                         getattr(cause, "pid", None), getattr(cause, "call", None), getattr(cause, "host", None),
                         getattr(cause, "reason", ""))

    @property
    def report(self):
        """The first failure's report (built once every worker was stopped)."""
        return getattr(self.cause, "report", None)


# In a worker, the path of the driver's script while it is imported (as __mp_main__) to find a
# function of it; None otherwise. A Cluster started then is the script's unguarded entry point.
importing_main: str | None = None


def reference(target) -> dict:
    """How a worker finds `target`: module + qualified name (module-level functions/classes only)."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if module is None or "<" in qualname:
        raise TypeError(f"{target!r} must be a module-level function or class so workers can import it")
    main = None
    if module == "__main__":
        main = getattr(sys.modules["__main__"], "__file__", None)
        main = os.path.abspath(main) if main else None
    return {"module": module, "qualname": qualname, "main": main}


def check_wait_timeout(name: str, timeout) -> None:
    """Raise ValueError unless `timeout` (waiting for call `name`) is None or positive seconds."""
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"{name}: timeout must be a positive number of seconds (or None), got {timeout!r}")


class CallFuture:
    """Results of one call on several ranks; `result()` returns them ordered by rank."""

    def __init__(self, cluster: "Cluster", call_id: int, ranks: list[int], name: str, single: bool = False):
        self.cluster, self.call_id, self.ranks, self.name, self.single = cluster, call_id, ranks, name, single
        self.values: dict[int, object] = {}
        self.errors: dict[int, dict] = {}
        self.died: Exception | None = None
        self._done = threading.Event()
        # Set by the driver thread when the call first fails: the time, and the peers that ranks
        # timed out waiting for (peer -> one rank that waited), to tell a stuck rank from a slow one.
        self.failed_at: float | None = None
        self.blamed: dict[int, int] = {}

    def _set(self, rank, ok, value):
        if ok:
            self.values[rank] = value
        else:
            self.errors[rank] = value
        if len(self.values) + len(self.errors) == len(self.ranks):
            self._done.set()

    def _fail(self, error: Exception):
        self.died = error
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None):
        check_wait_timeout(self.name, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._done.wait(0.05):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: no result after {timeout}s")
                thread = getattr(self.cluster, "_thread", None)
                if thread is not None and not thread.is_alive() and not self._done.is_set():
                    # Nobody is left to deliver the result (the driver thread ended or the cluster closed).
                    raise ClusterStopped(self.cluster._failure or RuntimeError("the cluster was closed"))
        except KeyboardInterrupt:
            # Ctrl-C: the caller gives up on the call, so the workers do too (the next call would
            # otherwise wait behind it).
            self.cluster.interrupt(self)
            raise
        if self.died is not None:
            raise self.died
        if self.errors:
            # The root cause is a rank that failed on its own, not one aborted because of it.
            causes = {r: e for r, e in self.errors.items() if not e.get("aborted")} or self.errors
            rank = min(causes)
            err = causes[rank]
            error = RemoteError(rank, err.get("type", "Error"), err.get("error", ""), err.get("traceback", ""),
                                self.name)
            error.report = self.cluster.report_call_failure(self.errors, rank, self.name)
            raise error
        values = [self.values[r] for r in self.ranks]
        return values[0] if self.single else values


class _ActorLifetime:
    """Queues (actor, ranks) on `dropped` when garbage-collected."""

    def __init__(self, dropped, actor_id: int, ranks: list[int]):
        weakref.finalize(self, dropped.append, (actor_id, list(ranks)))


def drop_unreferenced_actors(cluster, kind: str):
    """Before a call: drop the actors whose last handle went (sent as calls, in order)."""
    while cluster._dropped_actors and kind != "drop" and cluster._failure is None and not cluster._closed:
        actor, ranks = cluster._dropped_actors.popleft()
        cluster._call("drop", None, (), {}, ranks, actor=actor, name="drop")


class ActorGroup:
    """Handle on one actor instance per rank; `group.method(*args)` returns a CallFuture."""

    def __init__(self, cluster: "Cluster", actor_id: int, ranks: list[int], name: str, lifetime=None):
        self._cluster, self._actor_id, self._ranks, self._name = cluster, actor_id, ranks, name
        # Once no handle refers to the actor (this one and those __getitem__ made share `lifetime`),
        # its instances are dropped on their workers with the cluster's next call, as Ray's actors
        # go with their last handle: what they hold (groups and their arena regions, arrays) goes
        # too. Not sent from the finalizer itself: it may run anywhere, even inside Cluster._call.
        self._lifetime = lifetime or _ActorLifetime(cluster._dropped_actors, actor_id, ranks)

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs) -> CallFuture:
            future = self._cluster._call("method", None, args, kwargs, self._ranks, actor=self._actor_id,
                                         method=method, name=f"{self._name}.{method}")
            future.single = self._single
            return future

        return call

    _single = False

    def __getitem__(self, rank: int) -> "ActorGroup":
        """The instance on one rank: its calls' results are single values, not lists."""
        if rank not in self._ranks:
            raise IndexError(f"actor {self._name} has no instance on rank {rank}")
        single = ActorGroup(self._cluster, self._actor_id, [rank], self._name, self._lifetime)
        single._single = True
        return single


__all__ = ["where", "RemoteError", "WorkerLost", "WorkerDied", "WorkerUnresponsive", "WorkerStuck", "ClusterStopped",
           "CallFuture", "ActorGroup", "reference"]

"""The driver's watch over its workers: silent ones (no heartbeat) and stuck ones (no progress in a
call the other ranks gave up on).

Each worker's engine thread sends a heartbeat every `heartbeat_interval` seconds whatever its
compute thread does; any message counts as a sign of life. `LivenessMonitor` only keeps the books
and judges; the driver thread feeds it every message and asks it, after reading what arrived,
whether anyone must be reported (it raises the `WorkerLost` to report).
"""
from __future__ import annotations

import time

from ringpipe.runtime.calls import WorkerStuck, WorkerUnresponsive, where

STACK_ANSWER_S = 2.0  # how long a rank asked for its stack has to answer before it is reported without


class LivenessMonitor:
    """Books of one cluster's liveness: when each rank was last heard from, its last heartbeat, and
    the stacks asked of ranks that seem stuck. Driver thread only.

    `launcher` says whether a rank's process still runs, its pid and state (see runtime.launch);
    `ask_stack(rank)` sends the rank a request for its compute thread's stack."""

    def __init__(self, world_size: int, launcher, heartbeat_timeout: float, stuck_grace: float,
                 comm_timeout: float, ask_stack):
        self.world_size, self.launcher, self.ask_stack = world_size, launcher, ask_stack
        self.heartbeat_timeout, self.stuck_grace, self.comm_timeout = heartbeat_timeout, stuck_grace, comm_timeout
        self.last_heard: dict[int, float] = {}
        self.beats: dict[int, dict] = {}
        self.stack_asked: dict[tuple, float] = {}  # (call id, rank) -> time asked
        self.stacks: dict[int, str] = {}  # rank -> the stack's text
        self.last_check = time.monotonic()

    def start(self):
        """Every worker has just registered: the clocks start now."""
        now = time.monotonic()
        self.last_heard = {rank: now for rank in range(self.world_size)}
        self.last_check = now

    def heard(self, rank: int, value: dict):
        """Any message from `rank`; heartbeats and stacks are kept."""
        self.last_heard[rank] = time.monotonic()
        kind = value.get("t")
        if kind == "beat":
            self.beats[rank] = value
        elif kind == "stack":
            self.stacks[rank] = str(value.get("text", ""))

    def check(self, running: dict[int, str], failed: list):
        """Raise WorkerUnresponsive or WorkerStuck for the first rank that is; `running` is rank ->
        the call it was sent, `failed` the calls (CallFuture) that failed and are not done."""
        now = time.monotonic()
        stalled = now - self.last_check
        self.last_check = now
        if stalled > 1.0:
            # The driver itself was not listening (its process paused or starved): that time is
            # nobody's silence, so it does not count against the workers.
            for rank in self.last_heard:
                self.last_heard[rank] += stalled
        for rank, heard in self.last_heard.items():
            silent = now - heard
            if silent > self.heartbeat_timeout and self.launcher.poll(rank) is None:
                pid, host, note = self.launcher.pid(rank), self.launcher.host(rank), self.launcher.process_note(rank)
                raise WorkerUnresponsive(
                    f"worker rank {rank} {where(pid, host)} sent no heartbeat for {silent:.1f}s{note}; it was "
                    f"last heard {self.doing(rank, running)}; all workers stopped", rank, pid, running.get(rank),
                    host, reason=f"sent no heartbeat for {silent:.1f}s{note}")
        self._check_stuck(now, running, failed)

    def _check_stuck(self, now: float, running: dict[int, str], failed: list):
        """A rank still inside a call the others gave up on is stuck: ask for its stack, report it."""
        for future in failed:
            for rank in future.ranks:
                if rank in future.values or rank in future.errors:
                    continue
                waited_by = future.blamed.get(rank)
                # Ranks timed out waiting for this one: it already had the full communication
                # timeout. Otherwise it may still be computing towards its next collective.
                allowance = self.stuck_grace + (0.0 if waited_by is not None else self.comm_timeout)
                if now < future.failed_at + allowance:
                    continue
                asked = self.stack_asked.get((future.call_id, rank))
                if asked is None:
                    self.stack_asked[(future.call_id, rank)] = now
                    self.stacks.pop(rank, None)
                    self.ask_stack(rank)
                    continue
                if rank not in self.stacks and now - asked < STACK_ANSWER_S:
                    continue
                pid, host = self.launcher.pid(rank), self.launcher.host(rank)
                stack = self.stacks.get(rank) or (f"(no stack: rank {rank} did not answer"
                                                  f"{self.launcher.process_note(rank)})")
                cause = future.errors[waited_by if waited_by is not None else min(future.errors)]
                why = (f"rank {waited_by} timed out waiting for it" if waited_by is not None
                       else f"the call failed on rank {min(future.errors)}")
                error = " ".join(str(cause.get("error", "")).split())[:300]
                raise WorkerStuck(
                    f"worker rank {rank} {where(pid, host)} made no progress in {future.name}: {why} "
                    f"({error}) and it had not returned {now - future.failed_at:.1f}s later; it is "
                    f"{self.doing(rank, running)}; all workers stopped.\n--- stack of rank {rank} (pid {pid}) ---\n"
                    f"{stack.rstrip()}", rank, pid, future.name, stack, host,
                    reason=f"made no progress for {now - future.failed_at:.1f}s after {why}")

    def doing(self, rank: int, running: dict[int, str]) -> str:
        """What the rank was doing as far as the driver knows: its call, and what its last heartbeat said."""
        beat = self.beats.get(rank) or {}
        queued = running.get(rank)
        if not beat.get("name"):
            return f"between calls, with {queued} sent to it" if queued else "idle (between calls)"
        if queued and beat["name"] != queued:
            # The heartbeat is from an earlier call (beats come every second; a rank can die in
            # between): the call the driver sent is the better guess, and its beat's detail is stale.
            return f"running {queued} (sent to it after its last heartbeat, which was in {beat['name']})"
        doing = f"running {beat['name']}"
        if isinstance(beat.get("seconds"), (int, float)):
            doing += f" for {beat['seconds']:.1f}s"
        waits = [str(w) for w in beat.get("waiting") or []][:3]
        return doing + (f", {'; '.join(waits)}" if waits else ", in its own code (no communication pending)")


__all__ = ["LivenessMonitor"]

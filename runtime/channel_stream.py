"""A same-host channel's stream (runtime/shm_channel.py's GroupChannel is one): the asynchronous
collectives of a group run in the order they were called, one at a time, on the channel's own
thread, as a CUDA stream runs kernels. A waited-for collective queues behind them while any is
queued or running (busy()), so every member runs the group's collectives in the same order.

An operation still queued or running when its call ends is cancelled on every member: the engine
tells each member (an abort note), since a peer's next call must not meet it.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from types import SimpleNamespace

from ringpipe.runtime import shm_wait, thread_priority
from ringpipe.runtime.operations import Cancelled


class ChannelStream:
    """What GroupChannel adds to run asynchronous operations: `start_stream()` in its __init__;
    it has `engine`, `group` and `_wake_sleeper()`."""

    def start_stream(self):
        # Queued under _queue_lock (the engine thread looks at them to cancel), one token each in
        # _tokens for the thread to wake on (a SimpleQueue waits in C; a Condition's wait costs
        # ~20 µs of Python per operation).
        self._queue: deque = deque()
        self._queue_lock = threading.Lock()
        self._tokens = queue.SimpleQueue()
        self._thread = None
        self._running = None  # abort key of the operation this thread runs now
        self._cancelled_through = -1  # operations of calls up to this one are cancelled
        # Raised only while this job's ranks on the host have a core each (not the group's members:
        # ranks of other groups share the cores too): where they outnumber cores, a peer waited for
        # may need this core more than this thread does.
        nice = thread_priority.comm_thread_nice()
        self._nice = nice if self.host_ranks <= shm_wait.cores() else None
        self.priority_raised = None  # whether the thread got self._nice (once it started)

    def busy(self) -> bool:
        """True while asynchronous operations are queued or running: later ones must queue too."""
        # The queue first: _serve marks an operation running before it takes it off the queue, so
        # one of the two shows it at every moment (read the other way round, a look could miss it).
        return bool(self._queue) or self._running is not None

    def submit(self, handle, work, abort_key: tuple):
        """Run `work()` on this channel's thread after what is queued; its result or error goes to
        `handle`. The handle counts as the current call's (an unwaited one is cancelled at its end)."""
        handles = self.engine._call_handles
        if len(handles) >= 256:  # as Engine.submit: only the unfinished ones matter at the call's end
            handles[:] = [h for h in handles if not h.is_done()]
        handles.append(handle)
        with self._queue_lock:
            self._queue.append((handle, work, abort_key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True,
                                                name=f"ringpipe-channel-{self.group.gid}")
                self._thread.start()
        self._tokens.put(None)
        return handle

    def close(self, then):
        """The group is gone on this rank: `then()` runs once the operations queued here ended (on
        this channel's thread, which then stops; at once when it has none). Nothing runs after."""
        self.engine.abort_listeners.remove(self._wake_sleeper)
        self.engine.cancel_listeners.remove(self._cancel_call)
        with self._queue_lock:
            if self._thread is not None:
                self._queue.append((None, then, None))
                self._tokens.put(None)
                return
        then()

    def _serve(self):
        # Above the compute threads, so that a launched collective starts at once (runtime/thread_priority.py).
        try:  # (nothing may end this thread before its loop: the queued operations would never finish)
            self.priority_raised = thread_priority.apply(self._nice)
            if not self.priority_raised:
                thread_priority.say_refused(self._nice)
        except Exception:  # noqa: BLE001 - the thread keeps the process's priority
            self.priority_raised = False
        while True:
            self._tokens.get()
            with self._queue_lock:
                self._running = self._queue[0][2]  # before it leaves the queue (see busy())
                handle, work, abort_key = self._queue.popleft()
            if handle is None:  # closed (close()): its key, so _running, is None
                return work()
            try:
                if abort_key[1] <= self._cancelled_through:
                    raise self._cancelled(handle.name)
                result = work()
            except BaseException as exc:  # noqa: BLE001 - the handle's error
                if abort_key[1] <= self._cancelled_through and not isinstance(exc, Cancelled):
                    # Its call ended first: whichever abort woke it (the cancel note or the fence
                    # that follows), the cause is the cancellation.
                    cancelled = self._cancelled(handle.name)
                    cancelled.__cause__ = exc
                    exc = cancelled
                handle._set(error=exc)
            else:
                handle._set(result)
            finally:
                self._running = None
                # Held by nothing here while waiting for the next: what a work holds (a
                # communicator) must become garbage when the program drops it (its group closes so).
                handle = work = result = cancelled = None

    def _cancelled(self, name: str):
        return Cancelled(f"{name} was cancelled on rank {self.engine.rank}: its call ended before it finished; "
                         f"wait() for asynchronous operations before a call returns")

    def _cancel_call(self, call_id: int, what: str):
        """Engine thread, when call `call_id` ended: its asynchronous operations still queued or
        running here are cancelled, on every member (the engine's abort note reaches them)."""
        with self._queue_lock:
            pending = [key for _, _, key in self._queue if key[1] <= call_id]
            running = self._running if self._running is not None and self._running[1] <= call_id else None
        if not (pending or running):
            return
        self._cancelled_through = max(self._cancelled_through, call_id)
        self.engine.needs_fence = True
        keys = pending + ([running] if running else [])
        for epoch, call, gid, seq in keys:
            note = SimpleNamespace(abort_key=(gid, seq, self.group.ranks), epoch=epoch, call=call)
            self.engine._broadcast_abort(note, self._cancelled(f"{what}'s collective #{seq} on group {gid}"))
        self._wake_sleeper()


__all__ = ["ChannelStream"]

"""What the engine runs and hands back: the errors of communication, the `Handle` a user thread
waits on, a received `Message`, what an operation's generator may yield (`Recv`, `WaitSent`,
`WaitBlock`) and the engine's record of one `Operation`.
"""
from __future__ import annotations

import threading
import time


class CommError(RuntimeError):
    """A communication operation failed (timeout, mismatch, abort)."""


class CommTimeout(CommError, TimeoutError):
    pass


class CollectiveMismatch(CommError):
    pass


class Aborted(CommError):
    pass


class Cancelled(CommError):
    """The operation was still running when the call that started it ended (its handle was never
    waited on there); it was stopped on every member, since a peer's next call must not match it."""


class GroupDestroyed(CommError):
    """The group was destroyed on this rank (`Communicator.destroy()`): it takes no operation."""


class GroupDestroyedByPeer(GroupDestroyed, Aborted):
    """A member this operation needs destroyed the group, or dropped it (maybe as its call failed):
    it will not take part. A consequence of that member, as an abort is (the driver reports a
    member's own failure before it)."""


class Handle:
    """The result of an asynchronous operation: `wait()` returns it or raises its error.

    Done-ness is a lock held from creation until `_set` releases it: a waiter acquires and releases
    it again, in C. threading.Event's Condition does the same in Python, and cost ~20 µs of CPU more
    per operation handed to another thread here (a channel's or the engine's)."""

    __slots__ = ("_pending", "_done", "_result", "_error", "name", "_transform")

    def __init__(self, name: str, transform=None):
        self._pending = threading.Lock()
        self._pending.acquire()
        self._done = False  # (not the lock's state: a waiter holds it for a moment)
        self._result = None
        self._error = None
        self._transform = transform
        self.name = name

    def is_done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None):
        if not self._done:
            if not self._pending.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
                raise CommTimeout(f"{self.name}: not finished after waiting {timeout}s")
            try:
                self._pending.release()  # (for other waiters)
            except RuntimeError:  # a second _set released it meanwhile
                pass
        if self._error is not None:
            raise self._error
        if self._transform is not None:
            self._result, self._transform = self._transform(self._result), None
        return self._result

    def _set(self, result=None, error=None):
        self._result, self._error = result, error
        self._done = True
        try:
            self._pending.release()
        except RuntimeError:  # set twice (an abort racing the end): as Event.set, the last one stands
            pass


class Finished(Handle):
    """The handle of an operation that finished before it was returned (a send into a ring): no
    event to make or wait on."""

    __slots__ = ()

    def __init__(self, name: str, result=None, error=None):
        self.name, self._result, self._error, self._transform, self._pending = name, result, error, None, None
        self._done = True

    def is_done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None):
        if self._error is not None:
            raise self._error
        return self._result


class Message:
    """One received data-plane message: inline arrays (read-only views of ZeroMQ frames) or
    references to blocks of the sender's shared-memory arena."""

    __slots__ = ("src", "meta", "inline", "shm")

    def __init__(self, src, meta, inline, shm):
        self.src, self.meta, self.inline, self.shm = src, meta, inline, shm


# What an operation's generator can yield.
class Recv:
    __slots__ = ("key", "peer")

    def __init__(self, key, peer):
        self.key, self.peer = key, peer


class WaitSent:
    __slots__ = ("tracker", "peer")

    def __init__(self, tracker, peer):
        self.tracker, self.peer = tracker, peer


class WaitBlock:
    __slots__ = ("nbytes",)

    def __init__(self, nbytes):
        self.nbytes = nbytes


class Operation:
    __slots__ = ("name", "generator", "handle", "deadline", "timeout", "waiting", "abort_key", "epoch", "call",
                 "trace", "start_ns", "blocked_ns", "wait_ns")

    def __init__(self, name, generator, handle, timeout, abort_key, epoch, call, trace):
        self.name, self.generator, self.handle = name, generator, handle
        self.timeout, self.deadline = timeout, time.monotonic() + timeout
        self.abort_key, self.epoch, self.call = abort_key, epoch, call
        self.waiting = None
        # Tracing: (span name, args) or None; wait_ns sums the time blocked on a peer's message.
        self.trace, self.start_ns, self.blocked_ns, self.wait_ns = trace, 0, 0, 0


__all__ = ["CommError", "CommTimeout", "CollectiveMismatch", "Aborted", "Cancelled", "Handle", "Finished", "Message",
           "Recv", "WaitSent", "WaitBlock", "Operation"]

"""What the communicators of one group share (`Communicator.using` makes more of them): the
numbers of its collectives, and its life. A group is destroyed once on each rank, by `destroy()` or
when its last communicator is garbage; its same-host channel then goes (runtime/channel_regions.py).
"""
from __future__ import annotations

import threading
import weakref

from ringpipe.runtime.channel_regions import close_group
from ringpipe.runtime.operations import GroupDestroyed


class GroupState:
    def __init__(self, engine, group):
        self._lock = threading.Lock()
        self._epoch = (0, 0)
        self._value = 0
        self.gid, self.destroyed = group.gid, None  # destroyed: how, once destroyed on this rank
        # Run by destroy() or when this state is garbage; it holds the engine and the group only.
        self._finalizer = weakref.finalize(self, close_group, engine, group)
        self._finalizer.atexit = False  # at exit the arena goes with the process

    def next(self, epoch: tuple) -> int:
        """The next collective's number: they restart at 0 in every call and every epoch (after an
        abort), so a collective one rank left unfinished in a call does not shift the next call's.
        `epoch` = (abort epoch, call id)."""
        with self._lock:
            if epoch != self._epoch:
                self._epoch, self._value = epoch, 0
            self._value += 1
            return self._value - 1

    def check_alive(self, what: str):
        """Raise GroupDestroyed for operation `what` once the group is destroyed on this rank."""
        if self.destroyed is not None:
            raise GroupDestroyed(f"{what} on group {self.gid}: the group was {self.destroyed}")

    def destroy(self, how: str, channel=None):
        """Destroy the group on this rank (a second time: nothing), after the operation `channel`
        (its same-host channel, if open) runs in another thread, if any."""
        if self.destroyed is None:
            self.destroyed = how
            if channel is not None and channel.lock.acquire(timeout=10.0):
                channel.lock.release()
            self._finalizer()


__all__ = ["GroupState"]

"""What the communicators of one group share (`Communicator.using` makes more of them): the
numbers of its collectives, and its life. A group is destroyed once on each rank, by `destroy()` or
when its last communicator is garbage; its same-host channel then goes (runtime/channel_regions.py).

Members of a new group must agree on its members, and nothing checks it as the group is made (its
id is derived from the members without communicating, and non-members need not call new_group): a
member whose list differs just never answers. So each member of a new group tells every rank of
the parent group which members it chose (a one-way "made" note over the engine), and a waited-for
collective of the group that times out names the lists of the members it waited for when they differ.
"""
from __future__ import annotations

import itertools
import threading
import weakref

from ringpipe.runtime.channel_regions import close_group
from ringpipe.runtime.operations import CommTimeout, GroupDestroyed

MADE_KEPT = 64  # the last groups made per (rank, parent group) kept for the check


class GroupState:
    def __init__(self, engine, group):
        self._lock = threading.Lock()
        # (epoch, the numbers left in it): one attribute, read once, so a thread that starts a new
        # epoch never hands another thread a number of the wrong one; next() on an
        # itertools.count is atomic under the GIL, so the common case takes no lock (it runs
        # before every collective, small ones included).
        self._numbers = ((0, 0), itertools.count())
        self.gid, self.destroyed = group.gid, None  # destroyed: how, once destroyed on this rank
        # Run by destroy() or when this state is garbage; it holds the engine and the group only.
        self._finalizer = weakref.finalize(self, close_group, engine, group)
        self._finalizer.atexit = False  # at exit the arena goes with the process

    def next(self, epoch: tuple) -> int:
        """The next collective's number: they restart at 0 in every call and every epoch (after an
        abort), so a collective one rank left unfinished in a call does not shift the next call's.
        `epoch` = (abort epoch, call id)."""
        numbers = self._numbers
        if numbers[0] != epoch:
            with self._lock:
                numbers = self._numbers
                if numbers[0] != epoch:
                    numbers = self._numbers = (epoch, itertools.count())
        return next(numbers[1])

    def check_alive(self, what: str):
        """Raise GroupDestroyed for operation `what` once the group is destroyed on this rank."""
        if self.destroyed is not None:
            raise GroupDestroyed(f"{what} on group {self.gid}: the group was {self.destroyed}")

    def destroy(self, how: str, channel=None):
        """Destroy the group on this rank (a second time: nothing), after the operation `channel`
        (its same-host channel, if open) runs in another thread, if any."""
        if self.destroyed is None:
            self.destroyed = how
            if channel is not None:
                if channel.lock.acquire(timeout=10.0):
                    channel.lock.release()
                # Its latency path does not look at the group's life (that would cost a check per
                # small collective), and the channel leaves engine.channels only once the engine
                # thread closes it: off now, so the next collective takes the checked path and raises.
                channel.small = None
            self._finalizer()


def announce_group(engine, parent, members: tuple):
    """Tell every rank of group `parent` (but this one) that this rank made a group of `members`."""
    for peer in parent.ranks:
        if peer != engine.rank:
            engine.send(peer, {"k": "made", "g": parent.gid, "m": list(members)})


def on_made(engine, src: int, header: dict):
    """The engine thread's part: keep rank `src`'s note that it made a group of group `header["g"]`."""
    members = header.get("m")
    if isinstance(header.get("g"), str) and isinstance(members, list) and all(isinstance(m, int) for m in members):
        made = engine.__dict__.setdefault("groups_made", {}).setdefault((src, header["g"]), [])
        made.append(tuple(members))
        del made[:-MADE_KEPT]


def disagreement(engine, group) -> str | None:
    """Why group `group` may never complete: a member whose new_group of the same parent group chose
    other members (from their "made" notes), or None when every member's notes agree."""
    parent, _, _ = group.gid.rpartition("/")
    made = engine.__dict__.get("groups_made", {})
    for peer in group.ranks:
        lists = made.get((peer, parent))
        if peer != engine.rank and lists and tuple(group.ranks) not in lists:
            return (f"the members disagree: rank {engine.rank} made this group with new_group over world ranks "
                    f"{list(group.ranks)} of group {parent}, rank {peer} over {list(lists[-1])}")
    return None


def waited(communicator, handle):
    """`handle.wait()`; a timeout of a group whose members disagree (see disagreement) says so."""
    try:
        return handle.wait()
    except CommTimeout as exc:
        why = disagreement(communicator.engine, communicator.group) if "/" in communicator.group.gid else None
        if why is None:
            raise
        raise CommTimeout(f"{exc}; {why}") from None


__all__ = ["GroupState", "announce_group", "on_made", "disagreement", "waited"]

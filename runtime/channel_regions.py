"""The life of a same-host group's channel (runtime/shm_channel.py) and of the region it pins in
each member's arena: opened at the group's first collective (asynchronous or not), closed when the
group goes on a member (`Communicator.destroy()`, or its last communicator is garbage), and each
region given back once no member can touch it again.

A member's peers read its region's buffers and counters, and count themselves among its sleepers,
at the offset they learnt once when the channel opened. So a member gives its region back only when
the group has closed on every member: each member, once its last operation on the group ended,
sends every peer a note ("closed") over the engine, and the region goes back when the group closed
here and every peer's note is in, in whatever order. A peer that keeps the group keeps this rank's
region pinned (it may still use it). A collective waiting on a member that closed the group fails
at once (GroupDestroyedByPeer) instead of at its timeout.
"""
from __future__ import annotations

import logging
import threading

from ringpipe.runtime.operations import CommError, GroupDestroyedByPeer, Recv
from ringpipe.runtime.shm_channel import HEADER_BYTES, GroupChannel, buffer_bytes_for, region_bytes

log = logging.getLogger("ringpipe.runtime")


class ChannelRegions:
    """One engine's channel regions and closed groups, by group id (`engine.regions`)."""

    def __init__(self, engine):
        self.engine = engine
        self.offsets: dict[str, int] = {}  # this rank's region of each group whose channel opened
        self.closed_by: dict[str, set] = {}  # group -> global ranks whose "closed" note came
        self.closed_here: dict[str, tuple] = {}  # group -> members; closed here, waiting for peers' notes
        self._lock = threading.Lock()  # calling threads pin, the engine thread gives back
        self.opened = 0  # regions pinned so far (the worker collects garbage after a call that pinned one)

    def pin(self, gid: str, nbytes: int) -> int:
        """Offset of this rank's region of group `gid`, counters and signatures zeroed; -1 (and a
        warning) when the arena has no room."""
        arena = self.engine.arena
        with self._lock:
            offset = self.offsets.get(gid)
            if offset is None:
                offset = arena.pin(nbytes)
                if offset is None:
                    log.warning("rank %d: no room for group %s's same-host channel (%d MiB) in the shared-memory "
                                "arena (largest free block %d MiB of %d MiB): its collectives take the engine's "
                                "slower path; destroy() groups no longer used or give the cluster a larger "
                                "arena_bytes", self.engine.rank, gid, nbytes >> 20, arena.largest_free() >> 20,
                                arena.size >> 20)
                    self.engine.tracer.instant("no channel", "comm", {"group": gid, "bytes": nbytes})
                    return -1
                arena.view(offset, HEADER_BYTES)[...] = 0  # the block may hold an earlier payload
                self.offsets[gid] = offset
                self.opened += 1
        return offset

    def unpin(self, gid: str):
        """Give back this rank's region of `gid` now (a channel that did not open: nobody uses it)."""
        with self._lock:
            offset = self.offsets.pop(gid, None)
        if offset is not None:
            self.engine.arena.unpin(offset)

    def peers_gone(self, gid: str) -> set:
        """The (live) set of members that closed `gid`, for its channel's waits to look at."""
        return self.closed_by.setdefault(gid, set())

    # ---- engine thread ----------------------------------------------------------------------------
    def close(self, gid: str, members: tuple):
        """Group `gid` closed on this rank (no operation of it runs here any more): tell the peers,
        and give the region back if they closed it already."""
        engine = self.engine
        self.closed_here[gid] = members
        for peer in members:
            if peer != engine.rank:
                engine.send(peer, {"k": "closed", "g": gid})
        self._release(gid)

    def on_closed(self, peer: int, gid: str):
        """Member `peer` closed group `gid`: what it sent before is all that will come from it, so
        operations here waiting for more from it fail now."""
        self.peers_gone(gid).add(peer)
        engine = self.engine
        channel = engine.channels.get(gid)
        if channel is not None:
            channel._wake_sleeper()
        for op in list(engine.operations):
            waiting = op.waiting
            if isinstance(waiting, Recv) and waiting.peer == peer and waiting.key[3] == gid:
                engine._fail(op, self.gone(op.name, peer, gid))
        self._release(gid)

    def gone(self, name: str, peer: int, gid: str) -> GroupDestroyedByPeer:
        return GroupDestroyedByPeer(f"{name} on rank {self.engine.rank}: rank {peer} destroyed group {gid} before "
                              f"sending what this operation waits for")

    def _release(self, gid: str):
        members = self.closed_here.get(gid)
        if members is None or not self.closed_by.get(gid, set()).issuperset(set(members) - {self.engine.rank}):
            return
        del self.closed_here[gid]
        self.closed_by.pop(gid, None)
        self.unpin(gid)


def close_group(engine, group):
    """Any thread, a garbage collection's too (so this only hands over to the engine thread):
    `group` is gone on this rank. Its channel takes no new operation; once those it runs or has
    queued ended, the peers hear of it (ChannelRegions.close)."""
    engine.call_soon(lambda: _close(engine, group))


def _close(engine, group):
    with engine.send_lock:  # its payload count joins the total of the groups gone
        engine.bytes_sent[""] += engine.bytes_sent.pop(group.gid, 0)
    if not group.shm:
        return
    channel = engine.channels.pop(group.gid, None)
    if channel is None:
        engine.regions.close(group.gid, group.ranks)
    else:
        channel.close(lambda: engine.call_soon(lambda: engine.regions.close(group.gid, group.ranks)))


def exchange_entries(ctx, entry):
    """Engine algorithm (runtime/collectives.py style): every member's `entry`, in group order."""
    entries = {ctx.me: entry}

    def take(peer, message):
        entries[peer] = (message.meta or {}).get("o")

    yield from ctx.exchange(0, meta={"o": entry}, signed=True, take=take)
    return [entries[member] for member in range(ctx.n)]


def group_channel(engine, group, config, collective, attach, name: str, timeout, later: bool):
    """The channel of `group` for collective `name` about to run (None: the group keeps to the
    engine's algorithms), opened first at the group's first collective, whether that waits or not:
    every member's entry goes round in one exchange over the engine, at the same number on every
    member (`collective(name, signature, algorithm, finish, async_op, timeout)` runs it: the
    communicator's engine path). A collective that waits waits for the exchange here; an
    asynchronous one (`later`) must not wait for the peers (its program may first do what a peer
    needs before that arrives), so its channel finishes opening when the first operation queued on
    it runs (GroupChannel.connect). `attach(channel)` gives an open channel its latency path
    (runtime/shm_small.attach)."""
    channels = engine.channels
    channel = channels.get(group.gid, False)
    if channel is not False and (channel is None or channel.regions is not None or channel.busy()):
        return channel  # (an opening still underway: the operation queues behind the one opening it)
    if channel is not False:  # begun asynchronously and no operation finished it (cancelled, failed)
        try:
            if channel.connect():
                return channel
            channels[group.gid] = None  # a member had no room
        except CommError:  # (the collective that began it raised this): open again
            del channels[group.gid]
        channel.close(lambda: None)
        if group.gid in channels:
            return None

    def exchange(entry, later):
        return collective(f"{name} (opening the same-host channel)", {"op": "open channel"},
                          lambda ctx: exchange_entries(ctx, entry), None, later, timeout)

    channels[group.gid] = channel = open_channel(engine, group, config, exchange, attach, later)
    return channel


def open_channel(engine, group, config, exchange, attach, later: bool, mode: str | None = None):
    """This rank's channel of `group`, or None when some member has no room in its arena (every
    member then gets None, gives its region back, and the group keeps to the engine's algorithms);
    with `later`, a channel still opening (see group_channel). `exchange(entry, later)` returns
    every member's entry, in group order, or with `later` a Handle of them."""
    gone = engine.regions.closed_by.get(group.gid)
    if gone:  # opening needs every member, and that one is done with the group
        raise GroupDestroyedByPeer(f"opening group {group.gid}'s same-host channel on rank {engine.rank}: rank "
                             f"{min(gone)} destroyed the group before")
    arena = engine.arena
    buffer_bytes = buffer_bytes_for(arena.size, config.round_bytes)
    offset = engine.regions.pin(group.gid, region_bytes(buffer_bytes))
    entries = exchange([int(offset), int(buffer_bytes)], later)
    if later:
        def opening():
            regions = _regions(engine, group, buffer_bytes, entries.wait())
            if regions is not None:
                channel.map(regions)
                attach(channel)

        channel = GroupChannel(engine, group, None, buffer_bytes, mode, engine.regions.peers_gone(group.gid), opening)
        return channel
    regions = _regions(engine, group, buffer_bytes, entries)
    return regions and attach(GroupChannel(engine, group, regions, buffer_bytes, mode,
                                 engine.regions.peers_gone(group.gid)))


def _regions(engine, group, buffer_bytes: int, entries: list):
    """(mapping, offset) of every member's region from their entries; None, and this rank's region
    back, when one had no room."""
    regions = []
    for member, entry in zip(group.ranks, entries):
        mapping = engine.arena.buffer if member == engine.rank else engine.peer_arenas[member].buffer
        if (not isinstance(entry, list) or len(entry) != 2 or entry[0] < 0 or entry[1] != buffer_bytes
                or entry[0] + region_bytes(buffer_bytes) > mapping.size):
            engine.regions.unpin(group.gid)
            return None
        regions.append((mapping, entry[0]))
    return regions


__all__ = ["ChannelRegions", "close_group", "group_channel", "open_channel", "exchange_entries"]

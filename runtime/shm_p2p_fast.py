"""The common case of same-host point-to-point in one call into C each way: a blocking `send` of a
message in one ring slot or in one block of the sender's arena (up to PART_BYTES, the block taken
in Python), and a blocking `recv` of the message that comes next in the ring, from either
(runtime/csrc/shm_p2p.c, a CPython extension built on first use).

The ring, its slots and its rules are the pair ring's (runtime/shm_p2p.py); this path only skips
the Python layers of the common case. Everything else takes the Python path, which reads and
writes the same ring: tracing on, a full ring or arena, an array that is not C-contiguous or
larger than one part, the first message of a kind (the Python path
describes and checks it), a receive with receives of its key already posted or messages of its
key already kept, a next message of another key (kept for its receive), of an earlier call or
epoch (dropped). A receive waits in C (adaptive spin, then futex sleeps of at most SLICE_S
without the GIL), looking at aborts and its deadline between sleeps, and raises the Python
path's Aborted and CommTimeout.

`RINGPIPE_SHM_P2P_C=0` keeps every message on the Python path (to compare, or to test it); the
path is also off where the "c" wait mode or the extension cannot be built (no C compiler, no
Python headers).
"""
from __future__ import annotations

import os
import time

import msgpack
import numpy as np

from ringpipe.runtime import c_library, stream_store
from ringpipe.runtime.operations import Aborted, CommTimeout
from ringpipe.runtime.shm_channel import SLICE_S

MODULE = "_ringpipe_shm_p2p"
SOURCES = ("shm_p2p.c", "shm_wait.c")
OTHER, PENDING = -1, -2  # csrc/shm_p2p.c's answers besides "got it"
SLOTS = 64  # shm_p2p.SLOTS (that module imports this one)
_extension: list = []  # [module or None], built once per process


def extension():
    """The compiled extension, or None where it cannot be built (the reason is not needed: the
    Python path runs, and its tests cover that)."""
    if not _extension:
        try:
            _extension.append(c_library.extension(MODULE, "shm_p2p", SOURCES))
        except Exception:  # noqa: BLE001 - no compiler, no headers: the Python path
            _extension.append(None)
    return _extension[0]


def attach(rings):
    """`rings`' fast path (a FastPairs), or None where it is off (see the module docstring)."""
    if os.environ.get("RINGPIPE_SHM_P2P_C", "1") == "0" or getattr(rings.waiter, "mode", None) != "c":
        return None
    lib = extension()
    return FastPairs(rings, lib) if lib is not None else None


def send(comm, x, dst, tag) -> bool:
    """Communicator.send's fast path: True once `x` is in the ring to `dst` (see FastPairs.send)."""
    rings = comm.engine.rings
    return rings is not None and rings.fast is not None and rings.fast.send(comm, x, dst, tag)


def recv(comm, src, tag, out, timeout):
    """Communicator.recv's fast path: the message, or None for the Python path (FastPairs.recv)."""
    rings = comm.engine.rings
    return None if rings is None or rings.fast is None else rings.fast.recv(comm, src, tag, out, timeout)


class FastPairs:
    """One rank's fast path over its PairRings."""

    def __init__(self, rings, lib):
        self.rings, self.lib, self.engine = rings, lib, rings.engine
        self.slot_bytes = rings.slot_bytes
        self._out: dict = {}  # (group id, peer index) -> (address of the ring to it, its global rank)
        self._in: dict = {}  # (group id, peer index) -> (ring from it, its global rank, its arena, bytes)
        self._expected: dict = {}  # (group id, dtype, shape) -> the description a message of it has
        self._prefixes: dict = {}  # group id -> the start of every description of that group
        self.sent = self.received = 0  # messages that took this path (a test's evidence)
        self._arena_address = None  # where this rank's arena is mapped (its blocks of larger messages)
        self.host_known(rings.host_ranks)

    def host_known(self, host_ranks: int):
        """Streaming as this job's ranks on this host allow (PairRings.host_known)."""
        self.lib.set_stream_min(stream_store.stream_min_bytes(host_ranks))

    def send(self, comm, x, dst, tag) -> bool:
        """True once `x` is in the ring to `dst` (group index); False when the Python path must send it."""
        engine, rings = self.engine, self.rings
        if type(x) is not np.ndarray or engine.tracer.enabled or engine.aborted_call is not None or not comm.config.shm:
            return False
        gid = comm.group.gid
        target = self._out.get((gid, dst)) or self._ring(comm, dst, True)
        description = rings._descriptions.get((gid, x.dtype, x.shape))  # none: the first of its kind
        if target is None or description is None or type(tag) is not int:
            return False
        if x.nbytes > rings.inline_bytes:
            sent = x.nbytes <= rings.part_bytes and self._send_in_block(target, tag, description, x)
        else:
            with rings.send_lock:
                sent = self.lib.send(target[0], self.slot_bytes, engine.epoch, engine.call, tag, description, x, -1, 0)
        if sent:
            engine.count_sent(gid, x.nbytes)
            self.sent += 1
        return sent

    def _send_in_block(self, target, tag, description, x) -> bool:
        """`x` (one part's worth) in a block of this rank's arena, named by the next slot: as the
        Python path's `_place`, which frees the block once the receiver passed the slot."""
        engine, rings = self.engine, self.rings
        arena, ring = engine.arena, rings._out[target[1]]
        if not x.flags.c_contiguous:
            return False
        with rings.send_lock:
            head = ring.words[0]
            if head - ring.words[8] >= SLOTS:  # head (word 0) and tail (word 8): a full ring waits in Python
                return False
            rings.reclaim()
            generation = arena.generation  # before alloc: a block from before a reset is never freed
            block = arena.alloc(x.nbytes)
            if block is None:
                return False
            if self._arena_address is None:
                self._arena_address = int(arena.buffer.ctypes.data)
            if not self.lib.send(target[0], self.slot_bytes, engine.epoch, engine.call, tag, description, x, block,
                                 self._arena_address + block):
                arena.free(block)
                return False
            ring.blocks.append((head, block, generation))
        return True

    def recv(self, comm, src, tag, out, timeout):
        """The message from `src` (group index) with `tag`, in `out` when given; None when the
        Python path must receive it. Raises Aborted, or CommTimeout naming rank and peer."""
        engine, rings = self.engine, self.rings
        if engine.tracer.enabled or engine.aborted_call is not None or not comm.config.shm or type(tag) is not int:
            return None
        gid = comm.group.gid
        source = self._in.get((gid, src)) or self._ring(comm, src, False)
        if source is None:
            return None
        if out is None:
            description = self._prefixes.get(gid) or self._prefix(gid)
        elif type(out) is np.ndarray:
            description = self._expected.get((gid, out.dtype, out.shape)) or self._expect(gid, out)
        else:
            return None
        epoch, call = engine.epoch, engine.call
        arrival = (source[1], (call, gid, tag))
        patience = comm.config.timeout if timeout is None else timeout
        deadline = time.monotonic() + patience
        with rings.lock:
            # Receives of this key already posted, or its messages already read ahead: their order
            # is the Python path's. Otherwise the next message of the key is this receive's, and
            # taking it leaves both counts equal, as they were.
            if rings.tickets.get(arrival, 0) != rings.arrived.get(arrival, 0):
                return None
            spin = rings.spin
            found = self.lib.recv(source[0], self.slot_bytes, epoch, call, tag, description, out, spin.ns(),
                                  spin.yields, int(min(SLICE_S, patience) * 1e9), source[2], source[3])
            if found == PENDING:
                found = self._wait(comm, source, tag, description, out, deadline, patience)
            if found == OTHER:
                return None
            if out is None:  # the message is there; its description says what to receive it in
                slept, description = found
                described = rings._described.get(description) or rings._learn(description)
                out = np.empty(described[2], described[1])
                found = self.lib.recv(source[0], self.slot_bytes, epoch, call, tag, description, out, 0, 0, 0,
                                      source[2], source[3])
                found = slept if found == 0 else OTHER
            if found == OTHER:
                return None
            self.received += 1
        spin.answered(found == 0, found or None)
        return out

    def _wait(self, comm, source, tag, description, out, deadline, patience):
        """Sleeps of at most SLICE_S until the next message arrives (see `recv`), looking at aborts
        and the deadline between them as the Python path does."""
        engine = self.engine
        while True:
            if engine.aborted_call is not None:
                raise Aborted(engine.aborted_call)
            left = deadline - time.monotonic()
            if left <= 0:
                engine.timed_out_on.add(source[1])
                engine.needs_fence = True
                raise CommTimeout(f"recv from rank {comm.group.ranks.index(source[1])} tag {tag} on group "
                                  f"{comm.group.gid} on rank {engine.rank} timed out after {patience:g}s waiting "
                                  f"for a message from rank {source[1]}")
            found = self.lib.recv(source[0], self.slot_bytes, engine.epoch, engine.call, tag, description, out, 0,
                                  0, int(min(SLICE_S, left) * 1e9), source[2], source[3])
            if found != PENDING:
                return found

    def _ring(self, comm, peer, sending: bool):
        """(ring address, global rank) of the ring to group index `peer`, or from it (ring address,
        global rank, address and bytes of its arena mapped here); None when it is not a same-host
        peer with a ring (or not a valid index: the Python path raises)."""
        if type(peer) is not int or not 0 <= peer < comm.size:
            return None
        rank = comm.group.ranks[peer]
        if not self.rings.usable(rank):
            return None
        if sending:
            entry = (self.rings._ring(self.engine.rank, rank).head, rank)
        else:  # and where the sender's arena (its blocks of larger messages) is mapped here
            arena = self.engine.peer_arenas[rank]
            entry = (self.rings._ring(rank, self.engine.rank).head, rank, int(arena.buffer.ctypes.data), arena.size)
        table = self._out if sending else self._in
        if len(table) >= 1024:  # a cache, as the others: the entries of groups gone go with the rest
            table.clear()
        table[(comm.group.gid, peer)] = entry
        return entry

    def _expect(self, gid, out):
        description = msgpack.packb([gid, out.dtype.str, list(out.shape)])
        if len(self._expected) >= 1024:
            self._expected.clear()
        self._expected[(gid, out.dtype, out.shape)] = description
        return description

    def _prefix(self, gid):
        if len(self._prefixes) >= 1024:
            self._prefixes.clear()
        prefix = self._prefixes[gid] = msgpack.packb([gid, "", []])[: -2]  # [gid, ...: without the last two
        return prefix


__all__ = ["FastPairs", "attach", "extension", "send", "recv"]

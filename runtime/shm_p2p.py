"""Same-host point-to-point: per ordered pair of ranks a ring of message slots in the sender's arena,
written and read by the calling threads (no ZeroMQ message, no hop through the engine thread).

Each worker pins, before anything else uses its arena, one ring per rank of the world, so the
ring that rank s writes for rank d sits at d * ring_bytes in s's arena on every run: no handshake.
A ring's header holds `head` (messages written, raised by the sender) and `tail` (messages taken,
raised by the receiver), each with a sleeper count for the futex (runtime/shm_wait.py); then
SLOTS slots. A slot holds the message's key (epoch, call, group, tag), dtype and shape, and the
payload inline when it fits. A larger payload goes in parts of at most PART_BYTES, each in a
block of the sender's arena: the receiver copies part k out while the sender copies part k+1 in
(the two copies run on two cores at once), and gives the block back by raising `tail` past its
slot; the sender frees the blocks whose slots its receiver has passed (no "free" message). A send
never waits for its receiver except when the ring is full (SLOTS parts not yet taken), or the
arena has no room for a part.

A receive (`irecv`) takes a ticket for its key; `wait()` reads the ring in order until the
message with that ticket is there, keeping messages of other keys for their receives, and drops
messages of earlier calls or epochs.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from collections import defaultdict, deque

import msgpack
import numpy as np

from ringpipe.runtime import shm_p2p_fast, shm_p2p_single_copy, stream_store
from ringpipe.runtime.operations import Aborted, CommTimeout
from ringpipe.runtime.shm_wait import Spin, cores
from ringpipe.runtime.shm_wait import waiter as make_waiter
from ringpipe.runtime.trace import now_ns

HEADER_BYTES = 4096
HEAD, TAIL = 0, 64  # counters (u64) and, 8 bytes further, their sleeper counts (u32)
SLOTS = 64
META_BYTES = 512  # a slot's key, dtype, shape; the inline payload follows
# A slot's fixed fields: epoch, call, tag, arena block (-1: inline, REMOTE: in the sender's memory,
# runtime/shm_p2p_single_copy.py), part index, parts, when it was
# written (ns, for the receiver's trace), length of the description that follows at DESCRIPTION_AT:
# msgpack [group, dtype, shape], the same bytes for every message of one kind, so both sides
# cache it (no msgpack per message).
SLOT_HEADER = struct.Struct("<qqqqiiqq")
DESCRIPTION_AT = 64
REFUSED_AT = 56  # a REMOTE slot's receiver sets this byte: it could not read, the sender sends a copy
REMOTE = shm_p2p_single_copy.REMOTE
MIN_SLOT_BYTES = 4096
# Parts of a large message: small enough that the receiver's copy of one overlaps the sender's copy
# of the next, large enough that the per-part bookkeeping (~20 µs) is small next to a copy.
PART_BYTES = 1 << 20
SLICE_S = 0.1
_DTYPES: dict = {}  # a message's dtype string -> np.dtype (parsed once)


def _dtype(text: str) -> np.dtype:
    dtype = _DTYPES.get(text)
    if dtype is None:
        dtype = _DTYPES[text] = np.dtype(text)
    return dtype


def _writable(array: np.ndarray) -> bool:
    flags = array.flags
    return flags.c_contiguous and flags.writeable


def ring_layout(arena_size: int, world_size: int) -> int:
    """Bytes of one ring (slots of at most 16 KiB, the rings of all ranks taking at most a quarter
    of the arena), or 0 when the arena is too small for rings: point-to-point stays on the engine."""
    slot = min(16 << 10, (arena_size // 4 // max(world_size, 1) - HEADER_BYTES) // SLOTS) // 64 * 64
    return 0 if slot < MIN_SLOT_BYTES else HEADER_BYTES + SLOTS * slot


class _Ring:
    """One ring as mapped here: the addresses of its counters, the counters as 64-bit words (plain
    loads: an aligned 8-byte load is atomic), and its slots."""

    __slots__ = ("head", "tail", "words", "slots", "views", "blocks")

    def __init__(self, mapping: np.ndarray, slot_bytes: int):
        base = int(mapping.ctypes.data)
        self.head, self.tail = base + HEAD, base + TAIL
        self.words = memoryview(mapping[:HEADER_BYTES]).cast("Q")
        self.slots = [mapping[HEADER_BYTES + i * slot_bytes : HEADER_BYTES + (i + 1) * slot_bytes] for i in range(SLOTS)]
        self.views = [memoryview(slot) for slot in self.slots]
        self.blocks: deque = deque()  # sender side: (slot number, arena block, arena generation)


class PairRings:
    """This rank's rings: the ones it writes (in its arena) and reads (in its peers' arenas)."""

    def __init__(self, engine, world_size: int, ring_bytes: int, mode: str | None = None):
        self.engine, self.ring_bytes = engine, ring_bytes
        self.slot_bytes = (ring_bytes - HEADER_BYTES) // SLOTS
        self.inline_bytes = self.slot_bytes - META_BYTES
        self.part_bytes = max(1, min(PART_BYTES, engine.arena.size // 4))
        self.waiter = make_waiter(mode)
        self.world_size = world_size
        self.host_known(world_size)  # (until the worker knows its same-host peers: host_known again)
        self.lock, self.send_lock, self.reclaim_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self.tickets = defaultdict(int)  # (src, key) -> receives posted
        self.arrived = defaultdict(int)  # (src, key) -> messages read
        self.kept: dict = {}  # (src, key, index) -> (array, meta)
        self._out: dict[int, _Ring] = {}
        self._in: dict[int, _Ring] = {}
        self._descriptions: dict = {}  # sender: (group, dtype, shape) -> description bytes
        self._described: dict = {}  # receiver: description bytes -> (group, dtype, shape, nbytes)
        self.fast = shm_p2p_fast.attach(self)  # one call into C for the common case, or None
        self.single_copy = shm_p2p_single_copy.SingleCopy()  # sendrecv's reads of the sender's array

    def host_known(self, host_ranks: int):
        """This job's ranks on this host (the worker calls it once it knows its same-host peers): more
        than cores, the spin yields the core between looks and copies do not stream."""
        self.host_ranks, self.spin = host_ranks, Spin(host_ranks > cores(), host_ranks)
        if getattr(self, "fast", None) is not None:
            self.fast.host_known(host_ranks)

    @staticmethod
    def pin(arena, world_size: int) -> int:
        """Pin the rings at the start of a fresh arena; their size (0 when there are none)."""
        ring_bytes = ring_layout(arena.size, world_size)
        if ring_bytes and arena.pin(world_size * ring_bytes) != 0:
            return 0
        return ring_bytes  # a fresh arena file reads as zeros: the counters start at 0

    def usable(self, peer: int) -> bool:
        return peer != self.engine.rank and peer in self.engine.shm_peers

    def _ring(self, writer: int, reader: int) -> _Ring:
        mine = writer == self.engine.rank
        rings, peer = (self._out, reader) if mine else (self._in, writer)
        ring = rings.get(peer)
        if ring is None:
            mapping = self.engine.arena.buffer if mine else self.engine.peer_arenas[writer].buffer
            ring = rings[peer] = _Ring(mapping[reader * self.ring_bytes : (reader + 1) * self.ring_bytes],
                                       self.slot_bytes)
        return ring

    # ---- sending --------------------------------------------------------------------------------
    def send(self, dst: int, key: tuple, array: np.ndarray, name: str, timeout: float):
        """Put one message in the ring to `dst` (global rank): in one slot, or in parts of at most
        PART_BYTES in arena blocks. Raises CommTimeout naming `dst` when the ring stays full or the
        arena without room until `timeout`."""
        engine, deadline, nbytes = self.engine, time.monotonic() + timeout, array.nbytes
        flat = (array if array.flags.c_contiguous else np.ascontiguousarray(array)).reshape(-1).view(np.uint8)
        ring = self._out.get(dst) or self._ring(engine.rank, dst)
        description = self._descriptions.get((key[1], array.dtype, array.shape))
        if description is None:
            description = self._describe(key[1], array, name)
        meta = [engine.epoch, key[0], key[2], description, 0, 1]
        with self.send_lock:  # the parts of one message stay together
            if nbytes <= self.inline_bytes:
                self._send_part(ring, dst, meta, flat, -1, deadline, name, timeout)
            else:
                parts = -(-nbytes // self.part_bytes)
                part_bytes = -(-nbytes // parts)  # equal parts: the receiver finds them the same way
                meta[5] = parts
                for index in range(parts):
                    meta[4] = index
                    self._send_part(ring, dst, meta, flat[index * part_bytes : (index + 1) * part_bytes], None,
                                    deadline, name, timeout)
        engine.count_sent(key[1], nbytes)

    def _describe(self, group: str, array: np.ndarray, name: str) -> bytes:
        description = msgpack.packb([group, array.dtype.str, list(array.shape)])
        if len(description) > META_BYTES - DESCRIPTION_AT:
            raise ValueError(f"{name}: a {array.ndim}-dimensional shape is too long to send")
        if len(self._descriptions) >= 1024:
            self._descriptions.clear()
        self._descriptions[(group, array.dtype, array.shape)] = description
        return description

    def send_remote(self, dst: int, key: tuple, array: np.ndarray, name: str, timeout: float) -> int:
        """Put in the ring to `dst` where `array` (C-contiguous) lies in this process instead of its
        bytes (runtime/shm_p2p_single_copy.py); the slot's number, for `remote_taken`."""
        ring = self._out.get(dst) or self._ring(self.engine.rank, dst)
        description = self._descriptions.get((key[1], array.dtype, array.shape)) or self._describe(key[1], array, name)
        with self.send_lock:
            self._send_part(ring, dst, [self.engine.epoch, key[0], key[2], description, 0, 1],
                            self.single_copy.describe(array), REMOTE, time.monotonic() + timeout, name, timeout)
            return ring.words[HEAD // 8] - 1

    def remote_taken(self, dst: int, slot: int, deadline: float, name: str, timeout: float):
        """Waits until `dst` has passed `slot` (read the array, refused it, or dropped the message)."""
        ring = self._out[dst]
        self._wait(ring.tail, slot + 1, deadline, lambda: f"{name} on rank {self.engine.rank} timed out after "
                   f"{timeout:g}s waiting for rank {dst} to read its message", dst)

    def remote_passed(self, dst: int, slot: int) -> bool:
        return self._out[dst].words[TAIL // 8] > slot

    def remote_read(self, dst: int, slot: int) -> bool:
        """Whether `dst`, having passed `slot`, read it (False: it refused, see send_remote)."""
        return self._out[dst].slots[slot % SLOTS][REFUSED_AT] == 0

    def ring_from(self, src: int) -> _Ring:
        return self._in.get(src) or self._ring(src, self.engine.rank)

    def _send_part(self, ring: _Ring, dst, meta, piece, inline, deadline, name, timeout):
        head = ring.words[HEAD // 8]
        if head - ring.words[TAIL // 8] >= SLOTS:
            self._wait(ring.tail, head - SLOTS + 1, deadline, lambda: f"{name} on rank {self.engine.rank} timed out "
                       f"after {timeout:g}s waiting for rank {dst} to take its earlier messages", dst)
        slot = ring.slots[head % SLOTS]
        if inline is not None:  # -1: the payload, REMOTE: where it lies
            stream_store.copy(slot[META_BYTES : META_BYTES + piece.size], piece,
                              stream_store.stream_min_bytes(self.host_ranks))
            slot[REFUSED_AT], block = 0, inline
        else:
            block = self._place(ring, head, piece, deadline, name, timeout, dst)
        epoch, call, tag, description, index, parts = meta
        view = ring.views[head % SLOTS]
        SLOT_HEADER.pack_into(view, 0, epoch, call, tag, block, index, parts, now_ns(), len(description))
        view[DESCRIPTION_AT : DESCRIPTION_AT + len(description)] = description
        self.waiter.publish(ring.head, ring.head + 8, head + 1)

    def _place(self, ring: _Ring, head: int, piece, deadline, name, timeout, dst) -> int:
        """A block of this rank's arena holding `piece`, for the slot `head`; while the arena has no
        room, waits (bounded) for the receiver to pass more slots."""
        arena = self.engine.arena
        while True:
            self.reclaim()
            generation = arena.generation  # before alloc: a block from before a reset is never freed
            block = arena.alloc(piece.size)
            if block is not None:
                stream_store.copy(arena.view(block, piece.size), piece,
                                  stream_store.stream_min_bytes(self.host_ranks))
                ring.blocks.append((head, block, generation))
                return block
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommTimeout(f"{name} on rank {self.engine.rank} timed out after {timeout:g}s waiting for "
                                  f"rank {dst} to give shared memory back")
            # Any receiver passing a slot may free room; this one's does soonest (its blocks are
            # the oldest), others' within the slice.
            tail = ring.words[TAIL // 8]
            self.waiter.wait_at_least(ring.tail, ring.tail + 8, tail + 1, min(1e-3, left), 0, False)

    def reclaim(self) -> bool:
        """Free the blocks of parts their receivers have passed (`tail` beyond the slot), from any
        thread: the sender's next part, or the engine when its arena is full. True when any was."""
        engine, freed = self.engine, False
        arena = engine.arena
        with self.reclaim_lock:
            for ring in list(self._out.values()):  # a sender may add a ring meanwhile
                blocks = ring.blocks
                if blocks and blocks[0][0] < ring.words[TAIL // 8]:
                    tail = ring.words[TAIL // 8]
                    while blocks and blocks[0][0] < tail:
                        _, block, generation = blocks.popleft()
                        if generation == arena.generation:  # an abort's reset freed the older ones
                            freed = arena.free(block) or freed
        if freed and getattr(engine, "block_waits", None):
            engine.call_soon(engine.grant_blocks)  # the engine's own operations waiting for room
        return freed

    # ---- receiving --------------------------------------------------------------------------------
    def post(self, src: int, key: tuple) -> int:
        arrival = (src, key)
        with self.lock:
            ticket = self.tickets[arrival]
            self.tickets[arrival] = ticket + 1
            return ticket

    def take(self, src: int, key: tuple, ticket: int, deadline: float, name: str, timeout: float, block=True,
             out=None):
        """(array, when it arrived in ns, ns its copy took) of the message with `ticket` for `key`
        from `src` (written straight into `out` when it is a C-contiguous array of the message's
        shape and dtype); None when `block` is False and it has not arrived."""
        wanted = (src, key, ticket)
        with self.lock:
            found = self.kept.pop(wanted, None)
            while found is None:
                found = self._read_one(src, block, deadline, name, timeout, (key, ticket, out))
                if found is False:
                    return None
                if found is True:
                    found = self.kept.pop(wanted, None)
            return found

    def _read_one(self, src, block, deadline, name, timeout, wanted):
        """Read the next message from `src`'s ring (all its parts): the wanted one's entry (see
        `take`), or True once another was kept for its receive (or dropped); False when `block`
        is False and there is none."""
        engine = self.engine
        ring = self._in.get(src) or self._ring(src, engine.rank)
        if not block and ring.words[HEAD // 8] <= ring.words[TAIL // 8]:
            return False
        meta, data = self._read_part(src, ring, deadline, name, timeout)
        epoch, call, group, tag, dtype, shape, index, parts, _, _ = meta
        reading = now_ns()
        if index != 0:  # a part whose message's start an aborted receive took: dropped
            self._done_with_part(ring)
            return True
        first = meta
        stale = epoch < engine.epoch or call < engine.call  # of an aborted or an earlier call: dropped
        key = (call, group, tag)
        arrival = (src, key)
        number = self.arrived[arrival]
        mine = wanted[1] == number and wanted[0] == key
        out = wanted[2] if mine else None
        if stale:
            array = None
        elif out is not None and out.shape == shape and out.dtype == dtype and _writable(out):
            array = out
        else:
            array = np.empty(shape, dtype)
        flat = None if stale else array.reshape(-1).view(np.uint8)
        at = 0
        while True:
            if flat is not None and meta[8] == REMOTE:
                if not self.single_copy.read(src, data, flat):
                    ring.slots[ring.words[TAIL // 8] % SLOTS][REFUSED_AT] = 1  # the sender sends a copy next
                    stale = True
            elif flat is not None:
                flat[at : at + data.size] = data
            at += data.size
            self._done_with_part(ring)
            if index + 1 == parts:
                break
            meta, data = self._read_part(src, ring, deadline, name, timeout)
            if meta[:4] != first[:4] or meta[6] != index + 1:
                # The sender gave this message up (an abort) and the slot starts another one:
                # drop the part-message and leave the slot for the next read.
                stale = True
                break
            index = meta[6]
        if stale:
            return True
        self.arrived[arrival] = number + 1
        # The trace shows a receive as the engine's: blocked until the message arrived, then done
        # after the time the copy took (whenever the caller looks at it).
        entry = (array, meta[9], now_ns() - reading)
        if mine:
            return entry
        self.kept[(src, key, number)] = entry
        return True

    def _read_part(self, src, ring: _Ring, deadline, name, timeout):
        """The next slot's meta and a view of its payload (in the slot or in the sender's arena)."""
        tail = ring.words[TAIL // 8]
        if ring.words[HEAD // 8] <= tail:
            self._wait(ring.head, tail + 1, deadline, lambda: f"{name} on rank {self.engine.rank} timed out after "
                       f"{timeout:g}s waiting for a message from rank {src}", src)
        view = ring.views[tail % SLOTS]
        epoch, call, tag, block, index, parts, written, length = SLOT_HEADER.unpack_from(view)
        description = bytes(view[DESCRIPTION_AT : DESCRIPTION_AT + length])
        described = self._described.get(description)
        if described is None:
            described = self._learn(description)
        group, dtype, shape, nbytes = described
        meta = (epoch, call, group, tag, dtype, shape, index, parts, block, written)
        if parts > 1:  # equal parts, the last one shorter
            part_bytes = -(-nbytes // parts)
            nbytes = max(0, min(part_bytes, nbytes - index * part_bytes))
        if block < 0:
            size = nbytes if block == -1 else shm_p2p_single_copy.DESCRIPTOR.size
            return meta, ring.slots[tail % SLOTS][META_BYTES : META_BYTES + size]
        return meta, self.engine.peer_arenas[src].view(block, nbytes)

    def _learn(self, description: bytes) -> tuple:
        group, dtype, shape = msgpack.unpackb(description)
        nbytes = _dtype(dtype).itemsize
        for extent in shape:
            nbytes *= extent
        if len(self._described) >= 1024:
            self._described.clear()
        described = self._described[description] = (group, _dtype(dtype), tuple(shape), nbytes)
        return described

    def _done_with_part(self, ring: _Ring):
        """The slot, and the arena block it names, may be used again by the sender."""
        self.waiter.publish(ring.tail, ring.tail + 8, ring.words[TAIL // 8] + 1)

    def _wait(self, word: int, target: int, deadline: float, timeout_message, peer: int):
        """Until the counter at `word` reaches `target`; CommTimeout(timeout_message()) at `deadline`."""
        # Spin while a core is spare (adaptive, as the group channels'), then sleep in slices.
        spin = self.spin
        spun = spin.ns()
        value = self.waiter.wait_at_least(word, word + 8, target, 0.0, spun, spin.yields)
        if value >= target:
            spin.answered(True)
            return
        started = now_ns()
        while value < target:
            left = deadline - time.monotonic()
            if self.engine.aborted_call is not None:
                raise Aborted(self.engine.aborted_call)
            if left <= 0:
                self.engine.timed_out_on.add(peer)
                self.engine.needs_fence = True
                raise CommTimeout(timeout_message())
            value = self.waiter.wait_at_least(word, word + 8, target, min(SLICE_S, left), 0, False)
        spin.answered(False, spun + now_ns() - started)  # what a longer spin would have had to cover


__all__ = ["PairRings", "ring_layout"]

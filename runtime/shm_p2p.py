"""Same-host point-to-point: per ordered pair of ranks a ring of message slots in the sender's arena,
written and read by the calling threads (no ZeroMQ message, no hop through the engine thread).

Each worker pins, before anything else uses its arena, one ring per rank of the world, so the
ring that rank s writes for rank d sits at d * ring_bytes in s's arena on every run: no handshake.
A ring's header holds `head` (messages written, raised by the sender) and `tail` (messages taken,
raised by the receiver), each with a sleeper count for the futex (runtime/shm_wait.py); then
SLOTS slots. A slot holds the message's key (epoch, call, group, tag), dtype and shape, and the
payload inline when it fits, else the offset of a block of the sender's arena that the receiver
gives back with a "free" message (as before). A send never waits for its receiver except when the
ring is full (SLOTS messages not yet taken), or the arena has no room for a large payload.

A receive (`irecv`) takes a ticket for its key; `wait()` reads the ring in order until the
message with that ticket is there, keeping messages of other keys for their receives, and drops
messages of earlier calls or epochs (giving their blocks back).
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import defaultdict

import msgpack
import numpy as np

from ringpipe.runtime.operations import Aborted, Cancelled, CommTimeout
from ringpipe.runtime.shm_channel import MAX_SPIN_NS, MIN_SPIN_NS
from ringpipe.runtime.shm_wait import waiter as make_waiter
from ringpipe.runtime.trace import now_ns

HEADER_BYTES = 4096
HEAD, TAIL = 0, 64  # counters (u64) and, 8 bytes further, their sleeper counts (u32)
SLOTS = 64
META_BYTES = 512  # a slot's key, dtype, shape; the inline payload follows
MIN_SLOT_BYTES = 4096
SLICE_S = 0.1


def ring_layout(arena_size: int, world_size: int) -> int:
    """Bytes of one ring (slots of at most 16 KiB, the rings of all ranks taking at most a quarter
    of the arena), or 0 when the arena is too small for rings: point-to-point stays on the engine."""
    slot = min(16 << 10, (arena_size // 4 // max(world_size, 1) - HEADER_BYTES) // SLOTS) // 64 * 64
    return 0 if slot < MIN_SLOT_BYTES else HEADER_BYTES + SLOTS * slot


def _load(address: int) -> int:
    return ctypes.c_uint64.from_address(address).value


class PairRings:
    """This rank's rings: the ones it writes (in its arena) and reads (in its peers' arenas)."""

    def __init__(self, engine, world_size: int, ring_bytes: int, mode: str | None = None):
        self.engine, self.ring_bytes = engine, ring_bytes
        self.slot_bytes = (ring_bytes - HEADER_BYTES) // SLOTS
        self.waiter = make_waiter(mode)
        self.world_size = world_size
        self.spin_ns = MAX_SPIN_NS // 4
        # More ranks than cores: yield the core between looks while spinning.
        self.yields = world_size > len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else True
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.tickets = defaultdict(int)  # (src, key) -> receives posted
        self.arrived = defaultdict(int)  # (src, key) -> messages read
        self.kept: dict = {}  # (src, key, index) -> (array, meta)

    @staticmethod
    def pin(arena, world_size: int) -> int:
        """Pin the rings at the start of a fresh arena; their size (0 when there are none)."""
        ring_bytes = ring_layout(arena.size, world_size)
        if ring_bytes and arena.pin(world_size * ring_bytes) != 0:
            return 0
        return ring_bytes  # a fresh arena file reads as zeros: the counters start at 0

    def usable(self, peer: int) -> bool:
        return peer != self.engine.rank and peer in self.engine.shm_peers

    def _ring(self, writer: int, reader: int) -> np.ndarray:
        mapping = self.engine.arena.buffer if writer == self.engine.rank else self.engine.peer_arenas[writer].buffer
        return mapping[reader * self.ring_bytes : (reader + 1) * self.ring_bytes]

    @staticmethod
    def _counter(ring: np.ndarray, at: int) -> int:
        return int(ring[at : at + 8].view(np.uint64)[0])

    # ---- sending --------------------------------------------------------------------------------
    def send(self, dst: int, key: tuple, array: np.ndarray, name: str, timeout: float):
        """Put one message in the ring to `dst` (global rank): in one slot, or as parts in arena
        blocks of at most a quarter of the arena each. Raises CommTimeout naming `dst` when the ring
        stays full or the arena without room until `timeout`."""
        engine = self.engine
        deadline = time.monotonic() + timeout
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        inline = array.nbytes <= self.slot_bytes - META_BYTES
        parts = 1 if inline else -(-array.nbytes // (engine.arena.size // 4))
        part_bytes = max(1, -(-array.nbytes // parts))  # equal parts: the receiver finds them the same way
        with self.send_lock:  # the parts of one message stay together
            for index in range(parts):
                piece = flat[index * part_bytes : (index + 1) * part_bytes]
                self._send_part(dst, [engine.epoch, *key, array.dtype.str, list(array.shape), index, parts], piece,
                                inline, deadline, name, timeout)
        engine.count_sent(key[1], array.nbytes)

    def _send_part(self, dst, meta, piece, inline, deadline, name, timeout):
        ring = self._ring(self.engine.rank, dst)
        base = int(ring.ctypes.data)
        head = self._counter(ring, HEAD)
        self._wait(base + TAIL, head - SLOTS + 1, deadline, f"{name} on rank {self.engine.rank} timed out after "
                   f"{timeout:g}s waiting for rank {dst} to take its earlier messages", dst)
        slot = ring[HEADER_BYTES + (head % SLOTS) * self.slot_bytes :][: self.slot_bytes]
        if inline:
            slot[META_BYTES : META_BYTES + piece.size] = piece
            meta.append(-1)
        else:
            meta.append(self._place(piece, deadline, name, timeout, dst))
        packed = msgpack.packb([*meta, now_ns()])  # when it arrived, for the receiver's trace
        if len(packed) > META_BYTES - 4:
            raise ValueError(f"{name}: a {len(meta[5])}-dimensional shape is too long to send")
        slot[:4] = np.frombuffer(len(packed).to_bytes(4, "little"), np.uint8)
        slot[4 : 4 + len(packed)] = np.frombuffer(packed, np.uint8)
        self.waiter.publish(base + HEAD, base + HEAD + 8, head + 1)

    def _place(self, array, deadline, name, timeout, dst) -> int:
        """A block of this rank's arena holding `array`, waiting (bounded) while the arena is full."""
        pause = 20e-6
        while True:
            refs = self.engine.place_in_arena([array])
            if refs is not None:
                return refs[0][0]
            if time.monotonic() > deadline:
                raise CommTimeout(f"{name} on rank {self.engine.rank} timed out after {timeout:g}s waiting for "
                                  f"rank {dst} to give shared memory back")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    # ---- receiving --------------------------------------------------------------------------------
    def post(self, src: int, key: tuple) -> int:
        with self.lock:
            ticket = self.tickets[(src, key)]
            self.tickets[(src, key)] += 1
            return ticket

    def take(self, src: int, key: tuple, ticket: int, deadline: float, name: str, timeout: float, block=True,
             out=None):
        """(array, when it arrived in ns, ns its copy took) of the message with `ticket` for `key`
        from `src` (written straight into `out` when it is a C-contiguous array of the message's
        shape and dtype); None when `block` is False and it has not arrived."""
        with self.lock:
            while (src, key, ticket) not in self.kept:
                if not self._read_one(src, block, deadline, name, timeout, (key, ticket, out)):
                    return None
            return self.kept.pop((src, key, ticket))

    def _read_one(self, src, block, deadline, name, timeout, wanted) -> bool:
        """Read the next message from `src`'s ring (all its parts) and keep it for its receive;
        False when `block` is False and there is none."""
        engine = self.engine
        ring = self._ring(src, engine.rank)
        if not block and self._counter(ring, HEAD) <= self._counter(ring, TAIL):
            return False
        meta, data = self._read_part(src, ring, deadline, name, timeout)
        epoch, call, group, tag, dtype, shape, index, parts = meta[:8]
        reading = now_ns()
        if index != 0:  # a part whose message's start an aborted receive took: dropped
            self._done_with_part(src, ring, meta)
            return True
        first = meta
        stale = epoch < engine.epoch or call < engine.call  # of an aborted or an earlier call: dropped
        key = (call, group, tag)
        number = self.arrived[(src, key)]
        out = wanted[2] if (key, number) == wanted[:2] else None
        if stale:
            array = None
        elif (out is not None and out.flags.c_contiguous and out.flags.writeable and list(out.shape) == shape
              and out.dtype == np.dtype(dtype)):
            array = out
        else:
            array = np.empty(shape, np.dtype(dtype))
        flat = None if stale else array.reshape(-1).view(np.uint8)
        at = 0
        while True:
            if flat is not None:
                flat[at : at + data.size] = data
            at += data.size
            self._done_with_part(src, ring, meta)
            if index + 1 == parts:
                break
            meta, data = self._read_part(src, ring, deadline, name, timeout)
            if meta[:4] != first[:4] or meta[6] != index + 1:
                # The sender gave this message up (an abort) and the slot starts another one:
                # drop the part-message and leave the slot for the next read.
                stale = True
                break
            index = meta[6]
        if not stale:
            self.arrived[(src, key)] += 1
            # The trace shows a receive as the engine's: blocked until the message arrived, then
            # done after the time the copy took (whenever the caller looks at it).
            self.kept[(src, key, number)] = (array, meta[9], now_ns() - reading)
        return True

    def _read_part(self, src, ring, deadline, name, timeout):
        """The next slot's meta and a view of its payload (in the slot or in the sender's arena)."""
        base, tail = int(ring.ctypes.data), self._counter(ring, TAIL)
        self._wait(base + HEAD, tail + 1, deadline, f"{name} on rank {self.engine.rank} timed out after "
                   f"{timeout:g}s waiting for a message from rank {src}", src)
        slot = ring[HEADER_BYTES + (tail % SLOTS) * self.slot_bytes :][: self.slot_bytes]
        length = int.from_bytes(slot[:4].tobytes(), "little")
        meta = msgpack.unpackb(slot[4 : 4 + length].tobytes())
        dtype, shape, index, parts, block_offset = np.dtype(meta[4]), meta[5], meta[6], meta[7], meta[8]
        total = int(np.prod(shape)) * dtype.itemsize
        part_bytes = -(-total // parts) if parts > 1 else total
        nbytes = max(0, min(part_bytes, total - index * part_bytes))
        if block_offset < 0:
            return meta, slot[META_BYTES : META_BYTES + nbytes]
        return meta, self.engine.peer_arenas[src].view(block_offset, nbytes)

    def _done_with_part(self, src, ring, meta):
        """The slot (and the arena block, if any) may be used again by the sender."""
        base, tail = int(ring.ctypes.data), self._counter(ring, TAIL)
        self.waiter.publish(base + TAIL, base + TAIL + 8, tail + 1)
        if meta[8] >= 0:
            self.engine.send(src, {"k": "free", "o": int(meta[8])})

    def _wait(self, word: int, target: int, deadline: float, timeout_message: str, peer: int):
        value = _load(word)
        if value >= target:
            return
        # Adaptive spin, as the group channels' (shm_channel.py): longer after waits it answered.
        value = self.waiter.wait_at_least(word, word + 8, target, 0.0, self.spin_ns, self.yields)
        self.spin_ns = min(2 * self.spin_ns, MAX_SPIN_NS) if value >= target else max(self.spin_ns // 2, MIN_SPIN_NS)
        while value < target:
            left = deadline - time.monotonic()
            if self.engine.aborted_call is not None:
                raise Aborted(self.engine.aborted_call)
            if left <= 0:
                self.engine.timed_out_on.add(peer)
                self.engine.needs_fence = True
                raise CommTimeout(timeout_message)
            value = self.waiter.wait_at_least(word, word + 8, target, min(SLICE_S, left), 0, False)


class RingReceive:
    """The handle of a receive over a ring: `wait()` reads the ring in the calling thread."""

    def __init__(self, rings: PairRings, src: int, key: tuple, name: str, timeout: float, out, expect, finish,
                 trace):
        self.rings, self.src, self.key, self.name, self.timeout = rings, src, key, name, timeout
        self.ticket = rings.post(src, key)
        self.call = rings.engine.call
        self.deadline = time.monotonic() + timeout
        self.out, self.expect, self.finish, self.trace = out, expect, finish, trace
        self.start = now_ns()
        self._done, self._result, self._error = False, None, None

    def is_done(self) -> bool:
        if not self._done and self.call == self.rings.engine.call:
            found = self.rings.take(self.src, self.key, self.ticket, self.deadline, self.name, self.timeout,
                                    block=False, out=self.out)
            if found is not None:
                self._complete(*found)
        return self._done

    def wait(self, timeout: float | None = None):
        if not self._done:
            engine = self.rings.engine
            if self.call != engine.call:
                self._fail(Cancelled(f"{self.name} was cancelled on rank {engine.rank}: its call ended before it "
                                     f"finished; wait() for asynchronous operations before a call returns"))
            else:
                deadline = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
                try:
                    found = self.rings.take(self.src, self.key, self.ticket, deadline, self.name, self.timeout,
                                            out=self.out)
                except Exception as exc:  # noqa: BLE001 - the handle's error
                    self._fail(exc)
                else:
                    self._complete(*found)
        if self._error is not None:
            raise self._error
        return self._result

    def _complete(self, array, arrived_ns, read_ns):
        try:
            if self.expect is not None:
                shape, dtype = self.expect
                if shape != array.shape:
                    raise ValueError(f"{self.name} on rank {self.rings.engine.rank}: out has shape {shape}, "
                                     f"message has {array.shape}")
                if dtype != array.dtype:
                    raise ValueError(f"{self.name} on rank {self.rings.engine.rank}: out has dtype {dtype}, message "
                                     f"has {array.dtype} (no casting: receive into a {array.dtype} buffer, or "
                                     f"without out=)")
            if self.out is not None:
                if array is not self.out:
                    np.copyto(self.out, array)
                array = self.out
            self._done, self._result = True, self.finish(array)
            self._record(array.nbytes, arrived_ns, read_ns, None)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, arrived_ns, read_ns)

    def _fail(self, error, arrived_ns=None, read_ns=0):
        self._done, self._error = True, error
        self._record(None, arrived_ns, read_ns, error)

    def _record(self, nbytes, arrived_ns, read_ns, error):
        if self.trace is not None:
            arrived = max(self.start, arrived_ns if arrived_ns is not None else now_ns())
            args = dict(self.trace, wait_us=(arrived - self.start) / 1000.0)
            if nbytes is not None and args.get("bytes") is None:
                args["bytes"] = int(nbytes)
            if error is not None:
                args["error"] = type(error).__name__
            self.rings.engine.tracer.complete("recv", "comm", "comm", self.start, arrived + read_ns, args)


__all__ = ["PairRings", "RingReceive", "ring_layout"]

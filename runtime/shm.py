"""Shared-memory arenas: each worker owns one file in /dev/shm that same-host peers map.

A sender copies a payload into a block of its own arena and tells the receiver (offset, bytes)
over ZeroMQ, and the receiver reads the block straight from its mapping and sends a "free" back;
or, between ranks that use the pair rings (runtime/shm_p2p.py), the ring's slot names the block
and the receiver passing the slot gives it back.
The file is unlinked as soon as every peer has mapped it, so nothing is left behind even when a
process is killed; the mappings stay valid after the unlink.
"""
from __future__ import annotations

import mmap
import os
import threading

import numpy as np

SHM_DIR = "/dev/shm"
ALIGN = 64


def arena_path(job_id: str, rank: int) -> str:
    return os.path.join(SHM_DIR, f"ringpipe-{job_id}-{rank}")


def same_host(entry: dict, host: str) -> bool:
    """The one place that decides whether the peer of address-book `entry` is on this host, and so
    reached through shared memory rather than ZeroMQ: its "host" identity equals `host` (this
    worker's). An entry without one (a launcher that does not say) counts as this host."""
    return entry.get("host", host) == host


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


class Arena:
    """This worker's arena: a sparse file mapping with a first-fit block allocator."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)
        self._free = [(0, size)]  # sorted (offset, length) holes
        self._used: dict[int, int] = {}
        self._pinned: dict[int, int] = {}  # blocks that survive reset(): same-host channels (shm_channel.py)
        self._lock = threading.Lock()  # the engine thread and user threads sending directly
        self.generation = 0  # raised by reset(): blocks taken before it are free already

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a block of at least `nbytes`, or None when the arena is full right now."""
        length = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            return self._alloc(length)

    def _alloc(self, length: int) -> int | None:
        for i, (offset, hole) in enumerate(self._free):
            if hole >= length:
                if hole == length:
                    del self._free[i]
                else:
                    self._free[i] = (offset + length, hole - length)
                self._used[offset] = length
                return offset
        return None

    def pin(self, nbytes: int) -> int | None:
        """Like alloc, but the block stays taken through reset() until unpin() gives it back."""
        length = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            offset = self._alloc(length)
            if offset is not None:
                self._pinned[offset] = self._used.pop(offset)
            return offset

    def unpin(self, offset: int) -> bool:
        """Give back a block pin() took (False when `offset` is not one)."""
        with self._lock:
            length = self._pinned.pop(offset, None)
            if length is None:
                return False
            self._used[offset] = length
            return self._free_block(offset)

    def largest_free(self) -> int:
        """Bytes of the largest block alloc() or pin() could take right now."""
        with self._lock:
            return max((hole for _, hole in self._free), default=0)

    def free(self, offset: int) -> bool:
        with self._lock:
            return self._free_block(offset)

    def _free_block(self, offset: int) -> bool:
        length = self._used.pop(offset, None)  # None for a pinned block too: it stays
        if length is None:
            return False
        holes = self._free
        holes.append((offset, length))
        holes.sort()
        merged = [holes[0]]
        for start, size in holes[1:]:
            last_start, last_size = merged[-1]
            if last_start + last_size == start:
                merged[-1] = (last_start, last_size + size)
            else:
                merged.append((start, size))
        self._free = merged
        return True

    def reset(self):
        with self._lock:
            self.generation += 1
            self._free = [(0, self.size)]
            self._used.clear()
            for offset in sorted(self._pinned):
                self._take(offset, self._pinned[offset])

    def _take(self, offset: int, length: int):
        for i, (start, hole) in enumerate(self._free):
            if start <= offset and offset + length <= start + hole:
                pieces = [(start, offset - start), (offset + length, start + hole - offset - length)]
                self._free[i : i + 1] = [piece for piece in pieces if piece[1] > 0]
                return

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        return self.buffer[offset : offset + nbytes]

    def unlink(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self):
        self.unlink()
        self.buffer = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive; the mapping goes with the process
            pass


class PeerArena:
    """A read/write mapping of a same-host peer's arena."""

    def __init__(self, path: str, size: int):
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != size:
                raise ValueError(f"shared-memory arena {path} has the wrong size")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)

    def view(self, offset: int, nbytes: int) -> np.ndarray:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"shared-memory block [{offset}, {offset + nbytes}) outside the arena")
        return self.buffer[offset : offset + nbytes]

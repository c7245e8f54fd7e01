"""`sendrecv`: send one array and receive one in the same call, and between same-host ranks with
one copy: the receiver reads the sender's array straight from its memory (runtime/cma.py,
process_vm_readv), where a plain send copies it into the sender's arena and the receiver out of
it (runtime/shm_p2p.py).

That is safe only while the sender keeps its array as it is, so only here: inside one `sendrecv`
both sides are present until it returns, and the sender returns only once its receiver has passed
the message's ring slot. A plain send stays eager (it never waits for its receiver).

The slot of such a message holds, instead of the payload, where it lies: (pid, address, bytes,
and the address and nonce of the sender's probe word, runtime/cma.py). Before the first read from
a sender, the receiver probes it (`cma.can_read`). Where the probe or a read fails (not allowed:
EPERM under a strict Yama ptrace_scope or a seccomp filter; a pid of another PID namespace) or this
process does not read single-copy (`cma.wanted()`: `RINGPIPE_CMA=0`), the receiver marks the slot
refused and passes it; the sender then sends a copy the plain way, and sends copies to that
receiver from then on.
"""
from __future__ import annotations

import os
import struct
import time

import numpy as np

from ringpipe.runtime import cma

REMOTE = -2  # a slot's block number: the payload is in the sender's memory
# Messages in one part of the plain path (shm_p2p.PART_BYTES, 1 MiB) take it: its receive is one
# call into C (runtime/shm_p2p_fast.py), which beat a single-copy read there (CPU per sendrecv,
# 4 ranks, load 14: 220 against 404 µs at 256 KiB, 563 against 683 at 1 MiB); from 2 MiB the read
# costs less (1,177 against 1,523 µs; 10.4 against 17.8 ms at 32 MiB).
MIN_BYTES = (1 << 20) + 1
DESCRIPTOR = struct.Struct("<qqqqQ")  # pid, address, bytes, probe word's address, its nonce


class SingleCopy:
    """One rank's side of single-copy messages: the peers it reads from or sends copies to. `on`
    False (`cma.wanted()` was False when it was made): it neither sends nor reads them."""

    def __init__(self):
        self.on = cma.wanted()
        self._reader = cma.Reader()
        self.verified: set = set()  # senders whose probe read back right
        self.refused: set = set()  # receivers that could not read: they get copies

    def describe(self, array: np.ndarray) -> np.ndarray:
        """The slot payload naming where `array` (C-contiguous) lies, as bytes."""
        piece = np.empty(DESCRIPTOR.size, np.uint8)
        DESCRIPTOR.pack_into(piece, 0, os.getpid(), int(array.ctypes.data), array.nbytes, *cma.probe_word())
        return piece

    def read(self, src: int, descriptor, flat: np.ndarray) -> bool:
        """Copy the array `descriptor` names from rank `src` into `flat` (C-contiguous bytes of its
        size); False when it cannot be read here (the caller refuses the slot)."""
        pid, address, nbytes, probe_address, probe = DESCRIPTOR.unpack(bytes(descriptor))
        if not self.on or nbytes != flat.nbytes:
            return False
        if src not in self.verified:
            if not cma.can_read(self._reader, pid, probe_address, probe):
                return False
            self.verified.add(src)
        try:
            self._reader.read(pid, address, nbytes, int(flat.ctypes.data))
        except OSError:
            return False
        return True


def sendrecv(comm, x, dst: int, src: int, tag: int = 0, out=None, timeout: float | None = None):
    """Send `x` to `dst` and receive from `src` (group indices) in one call, as MPI_Sendrecv; returns
    what arrived (in `out` when given, as `recv`). Works on any communicator (`irecv`, `send`,
    `wait`); between same-host ranks of a ringpipe Communicator a message of MIN_BYTES or more is
    read from `x` by the receiver (see the module docstring), so do not change `x` from another
    thread meanwhile. Errors as `send` and `recv` (CommTimeout naming rank and peer, Aborted)."""
    engine = getattr(comm, "engine", None)
    rings = getattr(engine, "rings", None)
    if rings is None:  # another communicator (its sends may wait for their receive): receive first
        handle = comm.irecv(src, tag, out, timeout)
        comm.send(x, dst, tag, timeout)
        return handle.wait()
    dst_global = comm.group.ranks[dst] if 0 <= dst < comm.size else None
    if (dst_global is None or type(x) is not np.ndarray or not comm.config.shm or not rings.usable(dst_global)
            or not rings.single_copy.on or dst_global in rings.single_copy.refused
            or x.nbytes < max(MIN_BYTES, rings.part_bytes + 1) or x.dtype.kind not in "biufc"
            or engine.aborted_call is not None or engine.tracer.enabled):
        comm.send(x, dst, tag, timeout)  # eager: it never waits for its receiver
        return comm.recv(src, tag, out, timeout)  # (the one-call path where it applies)
    handle = comm.irecv(src, tag, out, timeout)  # posted first: a receive of `src`'s sendrecv is ready
    flat = np.ascontiguousarray(x)
    patience = comm.timeout if timeout is None else timeout
    name = f"sendrecv to rank {dst} tag {tag} on group {comm.group.gid}"
    key = (engine.call, comm.group.gid, int(tag))
    slot = rings.send_remote(dst_global, key, flat, name, patience)
    deadline = time.monotonic() + patience
    taken = None
    try:
        # Receive while `dst` reads: each side's read of its peer's array happens in its receive, so
        # no rank waits for its reader before its own receive. A refused slot is sent again as a
        # copy at once (the receiver waits for it, maybe before its own receive can end).
        incoming = rings.ring_from(comm.group.ranks[src])
        while not handle.is_done():
            if taken is None and rings.remote_passed(dst_global, slot):
                taken = _settle(rings, dst_global, slot, key, flat, name, deadline)
            if taken is not None or engine.aborted_call is not None or time.monotonic() >= deadline:
                break
            rings.waiter.wait_at_least(incoming.head, incoming.head + 8, incoming.words[0] + 1,  # head + 1
                                       min(1e-3, max(0.0, deadline - time.monotonic())), 0, False)
        result = handle.wait()
    finally:  # `flat` stays as it is until the receiver passed it, even when the receive failed
        if taken is None:
            rings.remote_taken(dst_global, slot, deadline, name, patience)
    if taken is None:
        taken = _settle(rings, dst_global, slot, key, flat, name, deadline)
    return result


def _settle(rings, dst_global, slot, key, flat, name, deadline) -> bool:
    """After `dst_global` passed the slot: count the bytes it read, or send it a copy (it could
    not read) and copies from then on. True."""
    if rings.remote_read(dst_global, slot):
        rings.engine.count_sent(key[1], flat.nbytes)
    else:
        rings.single_copy.refused.add(dst_global)
        rings.send(dst_global, key, flat, name, max(0.0, deadline - time.monotonic()))
    return True

__all__ = ["sendrecv", "SingleCopy", "REMOTE", "DESCRIPTOR", "MIN_BYTES"]

"""Moving arrays between two ranks inside an engine operation: inline ZeroMQ frames, or a block of
the sender's shared-memory arena when the peer is on the same host and the payload is large."""
from __future__ import annotations

import numpy as np

from ringpipe.runtime.messages import ZERO_COPY_BYTES
from ringpipe.runtime.operations import Recv, WaitSent


def send_arrays(engine, dst: int, header: dict, arrays, group_id: str, allow_shm: bool):
    """Generator (engine operations): send `arrays` to global rank `dst`; returns once the arrays
    may be reused (large inline payloads leave without a copy and are tracked)."""
    tracker = send_now(engine, dst, header, arrays, group_id, allow_shm, track=True)
    if tracker is not None:
        yield WaitSent(tracker, dst)


def send_now(engine, dst: int, header: dict, arrays, group_id: str, allow_shm: bool, track: bool):
    """Send `arrays` to global rank `dst` right away, from any thread: through this rank's arena
    when the peer is on this host and the payload large, else inline. Returns a ZeroMQ tracker
    (only when track=True and the payload went inline without a copy) or None."""
    nbytes = sum(a.nbytes for a in arrays)
    if (allow_shm and arrays and nbytes >= ZERO_COPY_BYTES and dst != engine.rank
            and dst in engine.shm_peers):
        refs = engine.place_in_arena(arrays)
        if refs is not None:  # else the arena is full right now: ZeroMQ rather than wait
            header["shm"] = refs
            engine.send(dst, header, (), None)
            engine.count_sent(group_id, nbytes)
            return None
    return engine.send(dst, header, arrays, group_id, track=track)


def receive(engine, key, src, out, expect, name):
    """Receive one array; into host array `out` if given. `expect` = (shape, dtype) of the caller's
    output buffer (host or device), which the message must match exactly."""
    message = yield Recv(key, src)
    if message.shm is not None:
        arrays = [view for _, view in message.shm]
    else:
        arrays = message.inline
    try:
        if len(arrays) != 1:
            raise ValueError(f"{name}: expected one array, got {len(arrays)}")
        array = arrays[0]
        if expect is not None:
            shape, dtype = expect
            if shape != array.shape:
                raise ValueError(f"{name} on rank {engine.rank}: out has shape {shape}, message has {array.shape}")
            if dtype != array.dtype:
                raise ValueError(f"{name} on rank {engine.rank}: out has dtype {dtype}, message has {array.dtype} "
                                 f"(no casting: receive into a {array.dtype} buffer, or without out=)")
        if out is not None:
            np.copyto(out, array)
            return out
        return np.array(array, copy=True)
    finally:
        if message.shm:
            for offset, _ in message.shm:
                engine.send(message.src, {"k": "free", "o": offset})

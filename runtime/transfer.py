"""Moving arrays between two ranks inside an engine operation: inline ZeroMQ frames, or a block of
the sender's shared-memory arena when the peer is on the same host and the payload is large."""
from __future__ import annotations

from runtime.engine import ZERO_COPY_BYTES, WaitSent


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
        refs = []
        for array in arrays:
            offset = engine.arena.alloc(array.nbytes)
            if offset is None:  # arena full right now: fall back to ZeroMQ rather than wait
                for ref in refs:
                    engine.arena.free(ref[0])
                refs = None
                break
            engine.arena.view(offset, array.nbytes).view(array.dtype).reshape(array.shape)[...] = array
            refs.append([offset, array.dtype.str, list(array.shape)])
        if refs is not None:
            header["shm"] = refs
            engine.send(dst, header, (), None)
            with engine.send_lock:
                engine.bytes_sent[group_id] += nbytes
            return None
    return engine.send(dst, header, arrays, group_id, track=track)

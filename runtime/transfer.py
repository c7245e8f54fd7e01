"""Moving arrays between two ranks inside an engine operation: inline ZeroMQ frames, or a block of
the sender's shared-memory arena when the peer is on the same host and the payload is large."""
from __future__ import annotations

from runtime.engine import ZERO_COPY_BYTES, WaitSent


def send_arrays(engine, dst: int, header: dict, arrays, group_id: str, allow_shm: bool):
    """Generator: send `arrays` to global rank `dst`; returns once the arrays may be reused."""
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
            engine.bytes_sent[group_id] += nbytes
            return
    tracker = engine.send(dst, header, arrays, group_id)
    if tracker is not None:
        yield WaitSent(tracker, dst)

"""Moving arrays between two ranks inside an engine operation: inline ZeroMQ frames, or a block of
the sender's shared-memory arena when the peer is on the same host and the payload is large."""
from __future__ import annotations

from ringpipe.runtime.messages import ZERO_COPY_BYTES
from ringpipe.runtime.operations import WaitSent


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

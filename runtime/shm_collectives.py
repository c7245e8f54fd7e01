"""Collectives over a same-host group channel (runtime/shm_channel.py), run by the calling thread.

A round = each member writes into its own buffer, publishes, waits until every member published,
then reads what it needs from the others' buffers. The first round of every collective also
carries the signature, checked by every member against every other. Payload counts as sent by
the member whose buffer peers read, as the engine's algorithms count it.
- all_reduce, small (<= SMALL_BYTES): one round; each member reduces every buffer in rank order
  (bitwise the same result everywhere, as the direct algorithm);
- all_reduce, large: per buffer-sized round, a reduce-scatter (each member reduces its slice of
  every buffer into its own buffer, all in parallel) and, after a second publish, an all-gather of
  the reduced slices;
- all_gather, reduce_scatter, broadcast: one round per buffer-sized piece; barrier: one empty round.
"""
from __future__ import annotations

import numpy as np

from ringpipe.runtime.collective_context import split_bounds

SMALL_BYTES = 64 << 10


def _first_round(channel, write) -> int:
    """Start a round: `write(parity)` fills this rank's buffer; the signature goes along when this
    is the collective's first round. Returns the parity once every member has published."""
    parity = channel.next_round()
    write(parity)
    channel.write_signature(parity)
    channel.publish()
    channel.wait_all()
    channel.check_signatures(parity)
    return parity


def _round(channel, write) -> int:
    parity = channel.next_round()
    write(parity)
    channel.publish()
    channel.wait_all()
    return parity


def all_reduce(channel, work: np.ndarray, reduce) -> np.ndarray:
    """Reduce the 1-D array `work` over the group, in place."""
    n, me = channel.n, channel.me
    if work.nbytes <= min(SMALL_BYTES, channel.buffer_bytes):
        def write(parity):
            channel.buffer(me, parity, work.dtype, work.size)[...] = work

        parity = _first_round(channel, write)
        # ((b0 + b1) + b2) + ...: the first reduction writes `work`, no copy of b0 before it.
        reduce(channel.buffer(0, parity, work.dtype, work.size), channel.buffer(1, parity, work.dtype, work.size),
               out=work)
        for peer in range(2, n):
            reduce(work, channel.buffer(peer, parity, work.dtype, work.size), out=work)
        channel.engine.count_sent(channel.group.gid, (n - 1) * work.nbytes)
        return work
    per_round = channel.elements_per_round(work.itemsize)
    for start in range(0, work.size, per_round):
        piece = work[start : start + per_round]

        def write(parity, piece=piece):
            channel.buffer(me, parity, piece.dtype, piece.size)[...] = piece

        parity = (_first_round if start == 0 else _round)(channel, write)
        bounds = split_bounds(piece.size, n)
        buffers = [channel.buffer(peer, parity, piece.dtype, piece.size) for peer in range(n)]
        mine = buffers[me][bounds[me] : bounds[me + 1]]
        for peer in range(n):
            if peer != me:
                reduce(mine, buffers[peer][bounds[me] : bounds[me + 1]], out=mine)
        # Nobody reads this rank's own slice before this second publish: reducing into it is safe.
        channel.publish()
        channel.wait_all()
        for peer in range(n):
            piece[bounds[peer] : bounds[peer + 1]] = buffers[peer][bounds[peer] : bounds[peer + 1]]
        channel.engine.count_sent(channel.group.gid, 2 * (n - 1) * (piece.nbytes // n))
    return work


def all_gather(channel, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = member i's x (out has a leading axis of size n)."""
    n, me = channel.n, channel.me
    flat, pieces = x.reshape(-1), out.reshape(n, -1)
    pieces[me] = flat
    per_round = channel.elements_per_round(x.itemsize)
    for start in range(0, max(flat.size, 1), per_round):
        piece = flat[start : start + per_round]

        def write(parity, piece=piece):
            channel.buffer(me, parity, piece.dtype, piece.size)[...] = piece

        parity = (_first_round if start == 0 else _round)(channel, write)
        for peer in range(n):
            if peer != me:
                pieces[peer, start : start + piece.size] = channel.buffer(peer, parity, piece.dtype, piece.size)
        channel.engine.count_sent(channel.group.gid, (n - 1) * piece.nbytes)
    return out


def reduce_scatter(channel, work: np.ndarray, reduce) -> np.ndarray:
    """`work` has shape (n, m): returns this rank's reduced row (m,), summed in rank order."""
    n, me = channel.n, channel.me
    columns = work.shape[1]
    result = np.empty(columns, work.dtype)
    per_round = max(1, channel.buffer_bytes // max(n * work.itemsize, 1))
    for start in range(0, max(columns, 1), per_round):
        part = work[:, start : start + per_round]
        width = part.shape[1]

        def write(parity, part=part, width=width):
            channel.buffer(me, parity, part.dtype, n * width).reshape(n, width)[...] = part

        parity = (_first_round if start == 0 else _round)(channel, write)
        mine = result[start : start + width]
        for peer in range(n):
            row = channel.buffer(peer, parity, part.dtype, n * width).reshape(n, width)[me]
            if peer == 0:
                mine[...] = row
            else:
                reduce(mine, row, out=mine)
        channel.engine.count_sent(channel.group.gid, (n - 1) * mine.nbytes)
    return result


def broadcast(channel, work: np.ndarray, root: int) -> np.ndarray:
    """Root's 1-D `work` into every member's `work`, in place."""
    me = channel.me
    per_round = channel.elements_per_round(work.itemsize)
    for start in range(0, max(work.size, 1), per_round):
        piece = work[start : start + per_round]

        def write(parity, piece=piece):
            if me == root:
                channel.buffer(me, parity, piece.dtype, piece.size)[...] = piece

        parity = (_first_round if start == 0 else _round)(channel, write)
        if me != root:
            piece[...] = channel.buffer(root, parity, piece.dtype, piece.size)
        else:
            channel.engine.count_sent(channel.group.gid, (channel.n - 1) * piece.nbytes)
    return work


def barrier(channel) -> None:
    _first_round(channel, lambda parity: None)


__all__ = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "SMALL_BYTES"]

"""Collectives over a same-host group channel (runtime/shm_channel.py), run by the calling thread.

A round = each member writes into its own buffer, publishes, waits until every member published,
then reads what it needs from the others' buffers. The first round of every collective also
carries the signature, checked by every member against every other. Payload counts as sent by
the member whose buffer peers read, as the engine's algorithms count it.
- all_reduce, one round (small, see ONE_ROUND_BYTES): each member sums every buffer in rank order
  (bitwise the same result everywhere, as the direct algorithm);
- all_reduce, larger: per buffer-sized round, pipelined chunks of a reduce-scatter straight from the
  peers' buffers into this rank's buffer and the caller's array, then an all-gather of the sums
  (see _reduce_round); sums in one pass through runtime/reduce_kernels.py;
- all_gather, reduce_scatter, broadcast: one round per buffer-sized piece; barrier: one empty round.
Large collectives read their peers' arrays single-copy instead (runtime/shm_cma.py: where the
group's probe allows, and at the sizes and operations where that measured faster here).
"""
from __future__ import annotations

import os

import numpy as np

from ringpipe.runtime import shm_cma, shm_reduce_chunks, stream_store
from ringpipe.runtime.reduce_kernels import c_sum, reduce_into

SMALL_BYTES = 64 << 10  # one round at any group size up to here
# Up to ONE_ROUND_BYTES, and while a rank reads at most ONE_ROUND_PEER_BYTES of its peers' buffers,
# the one-round reduce (one wait, every rank summing everything) beats reduce-scatter + all-gather
# (two waits, 1/n of the sum each). Measured on 2 cores: 2 ranks, 256 KiB and 1 MiB; 4 ranks,
# 256 KiB; at 1 MiB 4 ranks took ~15 % more CPU in one round (3 MiB read from peers each). On the
# Intel Xeon VM of 2026-12-01, 4 ranks at 256 KiB (one round up to 341 KiB) took 205-254 us against
# OpenMPI's 151-156; with one round up to 128 KiB (a peer limit of 384 KiB), 150-179 against 156-168
# (`bench collectives --world-size 4 --ops all_reduce --compare mpi`, 5-round medians).
ONE_ROUND_BYTES, ONE_ROUND_PEER_BYTES = 1 << 20, 384 << 10
# While every member has a core of its own (HOST_CORES: the host's count, alike on every member, not
# this process's affinity) and the copies peers read stream to memory (runtime/stream_store.py), the
# one-round reduce pays for every rank reading every peer's whole buffer from another core: above 32 KiB
# reduce-scatter + all-gather wins. 2 ranks, `bench collectives` medians of 7 interleaved rounds
# (one-round threshold 16 / 32 / 64 / 128 KiB): 32 KiB 28.5 / 23.5 / 35.1 / 38.6 us, 64 KiB 34.1 /
# 32.8 / 47.3 / 45.8, 128 KiB 44.1 / 42.7 / 45.7 / 49.5, 256 KiB 63.2 / 65.2 / 66.5 / 70.5.
ONE_ROUND_CORES_BYTES = 32 << 10
HOST_CORES = shm_cma.HOST_CORES
# Pipelined chunks of a large all_reduce (see chunk_elements): small enough that a chunk stays in the
# caches between its copy in, the peers' reads and its copy out, few enough that a loaded machine
# (no spin: every wait a trip through the scheduler) does not pay for many waits. 4 MiB while the
# loop was Python (each step cost tens of µs there), then 1 MiB. Since chunks take turns in two slots
# of the buffer (chunk_start), 2 ranks on the 2-core EPYC VM, `bench collectives --compare mpi`, three
# interleaved pairs of 5-round medians, 512 KiB chunks against 1 MiB: 2 MiB 127-203 vs 184-368 us,
# 4 MiB 277-572 vs 392-582 us; against 256 KiB: 4 MiB 297-426 vs 560-739 us.
CHUNK_BYTES = 512 << 10
CHUNK_SLOTS = 2  # (csrc/shm_reduce_chunks.c's SLOTS)


def chunk_start(lo: int, chunk: int, size: int) -> int:
    """Where (elements) the chunk of a round that starts at element `lo` of its piece of `size` sits
    in each member's buffer: a whole chunk k in slot k % CHUNK_SLOTS, so that a round reuses two
    chunks of buffer that stay in the caches instead of spreading the piece over the whole buffer
    (2 ranks, 4 MiB all_reduce: 815-848 -> 481-498 us, the piece's 4 MiB and the buffers' 2 x 4 MiB
    per rank had left the 32 MiB L3); a short last chunk at its own place, which no other chunk of
    the round uses.
    Why nothing is written while a peer reads it: a rank writes slot k % 2 in chunk k's copy in,
    after every peer published chunk k - 1's copy in, i.e. after each summed chunk k - 2 (what it
    read from this rank's copy in), and in chunk k's sum, after every peer published chunk k's copy
    in, i.e. after each copied out chunk k - 2's sums. Whole chunks share their parts' bounds, so
    the copy in of chunk k writes only where the peers' sums of chunk k - 2 were read; a short
    chunk's bounds differ, hence its own place."""
    return lo if lo + chunk > size else (lo // chunk) % CHUNK_SLOTS * chunk


def one_round_bytes(n: int) -> int:
    """The largest all_reduce (bytes) of a group of `n` that takes the one-round reduce (before the
    buffer's size and the single-copy path's choice): the Python round and the C one
    (runtime/shm_small.py) both choose by it, so members on either meet in the same round."""
    if n <= HOST_CORES:
        return ONE_ROUND_CORES_BYTES
    return max(SMALL_BYTES, min(ONE_ROUND_BYTES, ONE_ROUND_PEER_BYTES // max(n - 1, 1)))


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


def all_reduce(channel, work: np.ndarray, reduce, divisor: int = 0) -> np.ndarray:
    """Reduce the 1-D array `work` over the group, in place, then divide it by `divisor` when that
    is non-zero (an average)."""
    n, me = channel.n, channel.me
    if shm_cma.chosen(channel, "all_reduce", work.nbytes):
        done = _contiguous(work, lambda target: shm_cma.all_reduce(channel, target, reduce, divisor))
        if done is not None:
            return work
    if work.nbytes <= min(one_round_bytes(n), channel.buffer_bytes):
        def write(parity):
            stream_store.copy(channel.buffer(me, parity, work.dtype, work.size), work,
                              stream_store.stream_min_bytes(channel.host_ranks, work.nbytes))

        parity = _first_round(channel, write)
        # ((b0 + b1) + b2) + ... in rank order into `work`; this rank's own part is read from `work`
        # when it is one of the first two (the sum reads those before writing `out`).
        c = c_sum(work.dtype, reduce)
        if c is not None:
            at = work.ctypes.data
            c([at if peer == me < 2 else channel.buffer_address(peer, parity) for peer in range(n)], work.size,
              divisor, at)
        else:
            inputs = [work if peer == me < 2 else channel.buffer(peer, parity, work.dtype, work.size)
                      for peer in range(n)]
            reduce_into(reduce, inputs, work, divisor=divisor)
        channel.engine.count_sent(channel.group.gid, (n - 1) * work.nbytes)
        return work
    per_round = channel.elements_per_round(work.itemsize)
    for start in range(0, work.size, per_round):
        _reduce_round(channel, work[start : start + per_round], reduce, divisor, start == 0)
    return work


def chunk_elements(channel, itemsize: int) -> int:
    """Elements of one pipelined chunk of a large all_reduce: CHUNK_BYTES while every member can
    have a core of its own; a whole buffer when ranks outnumber the host's cores (every extra wait
    may then be a trip through the scheduler, dearer than what the pipeline saves). Every member
    must choose the same: the host's core count, not this process's affinity, decides."""
    if channel.n > HOST_CORES:
        return channel.elements_per_round(itemsize)
    return max(channel.n, CHUNK_BYTES // max(itemsize, 1))


def _reduce_round(channel, piece: np.ndarray, reduce, divisor: int, first: bool):
    """One buffer-sized round of a large all_reduce, in chunks that each go through three steps
    (as a shared-memory MPI transport does, without a copy into a temporary):
    1. copy in: this rank copies the parts of the chunk that its peers reduce into its buffer
       (its own part stays in `piece`), publishes;
    2. reduce: once every peer published its copy, this rank sums its own part of the chunk, in rank
       order, from `piece` and the peers' buffers, into its buffer and into `piece` in one pass
       (runtime/reduce_kernels.py), publishes;
    3. copy out: once every peer published its sum, it copies the peers' sums into `piece`.
    The copy in of chunk i + 1 goes between the sum of chunk i and the wait for the peers' sums, so
    a rank that is ahead has work to do instead of waiting; a chunk stays in the caches between the
    copy in, the peers' reads and the copy out. Every member publishes the same sequence, so "peer
    published k times" means the same step everywhere. Chunks take turns in two slots of each
    buffer (chunk_start, which says why nothing there is overwritten while a peer may read it).
    Where it can, the whole loop runs in C (runtime/shm_reduce_chunks.py), step for step the same."""
    if shm_reduce_chunks.reduce_round(channel, piece, reduce, divisor, first, chunk_elements(channel, piece.itemsize)):
        channel.engine.count_sent(channel.group.gid, 2 * (channel.n - 1) * (piece.nbytes // channel.n))
        return
    n, me = channel.n, channel.me
    dtype, size = piece.dtype, piece.size
    parity = channel.next_round()
    buffers = [channel.buffer(peer, parity, dtype, size) for peer in range(n)]
    mine = buffers[me]
    chunk = chunk_elements(channel, piece.itemsize)
    spans, shifts = [], []  # each chunk's part bounds, and its buffer index - piece index (chunk_start)
    for lo in range(0, size, chunk):
        hi = min(lo + chunk, size)
        spans.append([lo + (hi - lo) * i // n for i in range(n + 1)])
        shifts.append(chunk_start(lo, chunk, size) - lo)

    stream_min = stream_store.stream_min_bytes(channel.host_ranks, piece.nbytes)

    def copy_in(bounds, shift):
        if bounds[me] > bounds[0]:
            stream_store.copy(mine[bounds[0] + shift : bounds[me] + shift], piece[bounds[0] : bounds[me]], stream_min)
        if bounds[n] > bounds[me + 1]:
            stream_store.copy(mine[bounds[me + 1] + shift : bounds[n] + shift], piece[bounds[me + 1] : bounds[n]],
                              stream_min)

    c = c_sum(dtype, reduce)
    if c is not None:  # addresses by arithmetic: asking NumPy for each slice's costs microseconds
        itemsize, piece_at = piece.itemsize, piece.ctypes.data
        buffer_at = [channel.buffer_address(peer, parity) for peer in range(n)]
    copy_in(spans[0], shifts[0])
    if first:
        channel.write_signature(parity)
    channel.publish()
    for index, bounds in enumerate(spans):
        channel.wait_all(inside=not (first and index == 0))  # (inside: past the members' arrival)
        if first and index == 0:
            channel.check_signatures(parity)
        shift = shifts[index]
        own, slot_own = slice(bounds[me], bounds[me + 1]), slice(bounds[me] + shift, bounds[me + 1] + shift)
        if c is not None:
            skip, slot_skip = bounds[me] * itemsize, (bounds[me] + shift) * itemsize
            inputs = [piece_at + skip if peer == me else buffer_at[peer] + slot_skip for peer in range(n)]
            count = bounds[me + 1] - bounds[me]
            c(inputs, count, divisor, buffer_at[me] + slot_skip, piece_at + skip, 0 < stream_min <= count * itemsize)
        else:
            reduce_into(reduce, [piece[own] if peer == me else buffers[peer][slot_own] for peer in range(n)],
                        mine[slot_own], piece[own], divisor)
        channel.publish()
        if index + 1 < len(spans):
            copy_in(spans[index + 1], shifts[index + 1])
            channel.publish()
            channel.wait_all(behind=1, inside=True)
        else:
            channel.wait_all(inside=True)
        for peer in range(n):
            if peer != me:
                piece[bounds[peer] : bounds[peer + 1]] = buffers[peer][bounds[peer] + shift : bounds[peer + 1] + shift]
    channel.engine.count_sent(channel.group.gid, 2 * (n - 1) * (piece.nbytes // n))  # bytes, as the ring's


def all_gather(channel, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = member i's x (out has a leading axis of size n)."""
    n, me = channel.n, channel.me
    flat, pieces = x.reshape(-1), out.reshape(n, -1)
    if shm_cma.chosen(channel, "all_gather", flat.nbytes):
        done = _contiguous(pieces, lambda target: shm_cma.all_gather(channel, np.ascontiguousarray(flat), target))
        if done is not None:
            return out
    pieces[me] = flat
    per_round = channel.elements_per_round(x.itemsize)
    for start in range(0, max(flat.size, 1), per_round):
        piece = flat[start : start + per_round]

        def write(parity, piece=piece):
            stream_store.copy(channel.buffer(me, parity, piece.dtype, piece.size), piece,
                              stream_store.stream_min_bytes(channel.host_ranks))

        parity = (_first_round if start == 0 else _round)(channel, write)
        for peer in range(n):
            if peer != me:
                pieces[peer, start : start + piece.size] = channel.buffer(peer, parity, piece.dtype, piece.size)
        channel.engine.count_sent(channel.group.gid, (n - 1) * piece.nbytes)
    return out


def reduce_scatter(channel, work: np.ndarray, reduce, divisor: int = 0) -> np.ndarray:
    """`work` has shape (n, m): returns this rank's reduced row (m,), summed in rank order, then
    divided by `divisor` when that is non-zero (an average). A rank's own row is read from `work`,
    never copied into its buffer."""
    n, me = channel.n, channel.me
    if shm_cma.chosen(channel, "reduce_scatter", work.nbytes):
        done = shm_cma.reduce_scatter(channel, np.ascontiguousarray(work), reduce, divisor)
        if done is not None:
            return done
    columns = work.shape[1]
    result = np.empty(columns, work.dtype)
    c = c_sum(work.dtype, reduce) if work.flags.c_contiguous else None
    if c is not None:
        itemsize, work_at, result_at = work.itemsize, work.ctypes.data, result.ctypes.data
    per_round = max(1, channel.buffer_bytes // max(n * work.itemsize, 1))
    for start in range(0, max(columns, 1), per_round):
        part = work[:, start : start + per_round]
        width = part.shape[1]

        def write(parity, part=part, width=width):
            block = channel.buffer(me, parity, part.dtype, n * width).reshape(n, width)
            stream_min = stream_store.stream_min_bytes(channel.host_ranks, work.nbytes)  # (a reduction)
            stream_store.copy(block[:me], part[:me], stream_min)
            stream_store.copy(block[me + 1 :], part[me + 1 :], stream_min)

        parity = (_first_round if start == 0 else _round)(channel, write)
        if c is not None:  # addresses by arithmetic, as in _reduce_round
            skip = me * width * itemsize
            rows = [work_at + (me * columns + start) * itemsize if peer == me
                    else channel.buffer_address(peer, parity) + skip for peer in range(n)]
            c(rows, width, divisor, result_at + start * itemsize)
        else:
            rows = [part[me] if peer == me
                    else channel.buffer(peer, parity, part.dtype, n * width).reshape(n, width)[me] for peer in range(n)]
            reduce_into(reduce, rows, result[start : start + width], divisor=divisor)
        channel.engine.count_sent(channel.group.gid, (n - 1) * width * work.itemsize)
    return result


def broadcast(channel, work: np.ndarray, root: int) -> np.ndarray:
    """Root's 1-D `work` into every member's `work`, in place.

    Between the first round (every member checks every signature) and the last, a member waits
    only for the root: only the root's buffer is read, and the root still waits for every member
    before it writes a buffer again, so no member waits for another's copy (with more ranks than
    cores, such waits left cores idle at the end of every round). The last round waits for every
    member again: a member that left early could start the next collective two rounds ahead of a
    slower one, and overwrite the signature that one still checks."""
    me = channel.me
    if shm_cma.chosen(channel, "broadcast", work.nbytes):
        if _contiguous(work, lambda target: shm_cma.broadcast(channel, target, root)) is not None:
            return work
    per_round = channel.elements_per_round(work.itemsize)
    starts = range(0, max(work.size, 1), per_round)
    for start in starts:
        piece = work[start : start + per_round]

        def write(parity, piece=piece):
            if me == root:
                stream_store.copy(channel.buffer(me, parity, piece.dtype, piece.size), piece,
                                  stream_store.stream_min_bytes(channel.host_ranks))

        if start in (starts[0], starts[-1]) or me == root:
            parity = (_first_round if start == 0 else _round)(channel, write)
        else:
            parity = channel.next_round()
            channel.publish()
            channel.wait_for(root)
        if me != root:
            piece[...] = channel.buffer(root, parity, piece.dtype, piece.size)
        else:
            channel.engine.count_sent(channel.group.gid, (channel.n - 1) * piece.nbytes)
    return work


def _contiguous(array: np.ndarray, run):
    """`run(target)` on `array` itself when C-contiguous, else on a contiguous copy written back
    after (the single-copy path reads peers' arrays by address; whether to take it must not depend
    on this rank's layout, so every layout takes it). Returns what `run` returns."""
    if array.flags.c_contiguous:
        return run(array)
    target = np.ascontiguousarray(array)
    done = run(target)
    if done is not None:
        array[...] = target
    return done


def barrier(channel) -> None:
    _first_round(channel, lambda parity: None)


__all__ = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier", "SMALL_BYTES"]

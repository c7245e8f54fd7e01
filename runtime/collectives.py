"""Collective algorithms, each a generator run by the engine (see engine.py).

Three families, chosen by size and placement the same way on every rank (as NCCL does):
- direct: every rank sends its whole buffer to every other rank in one round — lowest latency for
  small buffers;
- shm: all members on one host; each rank copies its buffer into its shared-memory arena once and
  reads its peers' blocks directly (reduce-scatter then all-gather without any further copies);
- ring: chunked, pipelined ring (reduce-scatter then all-gather) over point-to-point messages —
  the algorithm across hosts; a chunk is forwarded as soon as it is reduced, so sending one chunk
  overlaps reducing the next.
Every algorithm's first message to the right-hand neighbour carries the caller's signature
(operation, shape, dtype, reduction, root); any disagreement is detected by some rank, which
aborts the collective on every member (see messages.MessageDispatch._broadcast_abort).
"""
from __future__ import annotations

import numpy as np

from ringpipe.runtime.collective_context import (CollectiveContext, choose_algorithm, exchange_blocks, guarded, notify_all,
                                        shm_round_elements, split_bounds)
from ringpipe.runtime.operations import WaitSent

REDUCTIONS = {"sum": np.add, "avg": np.add, "max": np.maximum, "min": np.minimum}


# ---- all_reduce ----------------------------------------------------------------------------------
def all_reduce(ctx: CollectiveContext, work: np.ndarray, op: str):
    """Reduce the 1-D array `work` over the group, in place; returns `work`."""
    if ctx.n > 1:
        reduce = REDUCTIONS[op]
        algorithm = choose_algorithm(ctx, work.nbytes)
        if work.size < ctx.n:
            # Fewer elements than ranks: some rank would have no ring segment (and shm no round)
            # and so send no signature; a disagreement could then go unseen. Direct sends every
            # signature to every rank, and is the fastest at this size anyway.
            algorithm = "direct"
        if algorithm == "direct":
            yield from direct_all_reduce(ctx, work, reduce)
        elif algorithm == "shm":
            yield from shm_all_reduce(ctx, work, reduce)
        else:
            yield from ring_all_reduce(ctx, work, reduce)
    if op == "avg":
        work /= ctx.n
    return work


def direct_all_reduce(ctx, work, reduce):
    parts = {ctx.me: work.copy()}

    def take(peer, message):
        parts[peer] = ctx.array(message, peer, 0, work)

    yield from ctx.exchange(0, [work], signed=True, take=take)
    # Every rank sums in rank order, so every rank gets bitwise the same result.
    work[...] = parts[0]
    for peer in range(1, ctx.n):
        reduce(work, parts[peer], out=work)


def ring_all_reduce(ctx, work, reduce):
    n, me = ctx.n, ctx.me
    right, left = (me + 1) % n, (me - 1) % n
    bounds = split_bounds(work.size, n)
    chunk = max(1, ctx.config.chunk_bytes // max(work.itemsize, 1))

    def chunks(segment):
        return [(lo, min(lo + chunk, bounds[segment + 1])) for lo in range(bounds[segment], bounds[segment + 1], chunk)]

    def step_key(step, index):
        return (step << 20) | index

    # Sends are not waited for one by one: a chunk's zero-copy send is waited for only before the
    # all-gather overwrites that chunk, and all of them before returning. (Waiting after every
    # send stalled the pipeline and kept the engine polling; across 3 CURVE hosts it cost 15-30 %
    # of the collective's CPU: 1.9-2.2 -> 1.55-1.63 cpu-s for 64 MiB, tools/bench_multihost.py.)
    in_flight = {}  # chunk start -> ZeroMQ tracker of the send still reading work[start:...]

    def send(step, index, lo, hi, meta=None):
        tracker = ctx.post(right, step_key(step, index), [work[lo:hi]], meta)
        if tracker is not None:
            in_flight[lo] = tracker

    for index, (lo, hi) in enumerate(chunks(me)):
        send(0, index, lo, hi, {"sig": ctx.signature} if index == 0 else None)
    last_step = 2 * n - 3
    for step in range(2 * n - 2):
        reducing = step < n - 1
        segment = (me - step - 1) % n
        for index, (lo, hi) in enumerate(chunks(segment)):
            message = yield from ctx.recv(left, step_key(step, index))
            if step == 0 and index == 0:
                ctx.check(message, left)
            incoming = ctx.array(message, left, 0, work[lo:hi])
            if lo in in_flight:
                yield WaitSent(in_flight.pop(lo), ctx.group.ranks[right])
            if reducing:
                reduce(work[lo:hi], incoming, out=work[lo:hi])
            else:
                work[lo:hi] = incoming
            ctx.release(message)
            if step < last_step:
                send(step + 1, index, lo, hi)
    for tracker in in_flight.values():
        yield WaitSent(tracker, ctx.group.ranks[right])


def shm_all_reduce(ctx, work, reduce):
    """Each rank copies its round into its arena, reduces its own slice from every peer's block,
    then copies every peer's reduced slice out. Two message rounds per data round plus one to
    release the blocks."""
    n, me = ctx.n, ctx.me
    round_elems = shm_round_elements(ctx, work.itemsize)
    for round_index, start in enumerate(range(0, work.size, round_elems)):
        piece = work[start : start + round_elems]
        offset, block = yield from ctx.own_block(piece)
        block[...] = piece
        blocks = yield from exchange_blocks(ctx, 3 * round_index, offset, block, round_index == 0)
        bounds = split_bounds(piece.size, n)
        mine = slice(bounds[me], bounds[me + 1])
        # Each slice is reduced by exactly one rank, so all ranks end up with identical values.
        for peer in range(n):
            if peer != me:
                reduce(block[mine], blocks[peer][mine], out=block[mine])
        yield from notify_all(ctx, 3 * round_index + 1)
        for peer in range(n):
            part = slice(bounds[peer], bounds[peer + 1])
            piece[part] = blocks[peer][part]
        yield from notify_all(ctx, 3 * round_index + 2)
        ctx.give_back_block(offset)
        # Peers read (n-1)/n of this block in each of the two phases: count it as sent, as a ring would.
        ctx.count_shared(2 * (n - 1) * (piece.nbytes // n))


# ---- all_gather ------------------------------------------------------------------------------------
def all_gather(ctx: CollectiveContext, x: np.ndarray, out: np.ndarray):
    """out[i] = rank i's x (out has a leading axis of size n)."""
    out[ctx.me] = x
    if ctx.n == 1:
        return out
    algorithm = choose_algorithm(ctx, out.nbytes)
    if algorithm == "shm":
        # In rounds of a slice of every rank's piece (one round, the first, even when empty).
        flat, pieces = x.reshape(-1), out.reshape(ctx.n, -1)
        per_round = shm_round_elements(ctx, x.itemsize)
        for index, start in enumerate(range(0, max(flat.size, 1), per_round)):
            piece = flat[start : start + per_round]
            offset, block = yield from ctx.own_block(piece)
            block[...] = piece
            blocks = yield from exchange_blocks(ctx, 2 * index, offset, block, index == 0)
            for peer in range(ctx.n):
                pieces[peer, start : start + piece.size] = blocks[peer]
            yield from notify_all(ctx, 2 * index + 1)
            ctx.give_back_block(offset)
            ctx.count_shared((ctx.n - 1) * piece.nbytes)
    elif algorithm == "ring":
        n, me = ctx.n, ctx.me
        right, left = (me + 1) % n, (me - 1) % n
        yield from ctx.send(right, 0, [x], {"sig": ctx.signature})
        for step in range(n - 1):
            source = (me - step - 1) % n
            message = yield from ctx.recv(left, step)
            if step == 0:
                ctx.check(message, left)
            out[source] = ctx.array(message, left, 0, x)
            ctx.release(message)
            if step < n - 2:
                yield from ctx.send(right, step + 1, [out[source]])
    else:
        def take(peer, message):
            out[peer] = ctx.array(message, peer, 0, x)

        yield from ctx.exchange(0, [x], signed=True, take=take)
    return out


# ---- reduce_scatter -----------------------------------------------------------------------------------
def reduce_scatter(ctx: CollectiveContext, work: np.ndarray, op: str):
    """work has shape (n, m): returns this rank's reduced row (m,)."""
    n, me = ctx.n, ctx.me
    reduce = REDUCTIONS[op]
    if n == 1:
        result = work[0].copy()
    else:
        algorithm = choose_algorithm(ctx, work.nbytes)
        if algorithm == "shm":
            # In rounds of columns: round i shares work[:, cols] (one round, the first, even when empty).
            result = np.empty(work.shape[1], work.dtype)
            per_round = shm_round_elements(ctx, n * work.itemsize)
            for index, start in enumerate(range(0, max(work.shape[1], 1), per_round)):
                part = work[:, start : start + per_round]
                offset, block = yield from ctx.own_block(part)
                block[...] = part
                blocks = yield from exchange_blocks(ctx, 2 * index, offset, block, index == 0)
                mine = result[start : start + part.shape[1]]
                mine[...] = blocks[0][me]
                for peer in range(1, n):
                    reduce(mine, blocks[peer][me], out=mine)
                yield from notify_all(ctx, 2 * index + 1)
                ctx.give_back_block(offset)
                ctx.count_shared((n - 1) * mine.nbytes)
        elif algorithm == "ring":
            # The reduce-scatter half of the ring all-reduce, on rows: row (me+1) ends fully reduced
            # here, so rank i sends its result for row i one hop left to finish.
            right, left = (me + 1) % n, (me - 1) % n
            acc = work.copy()
            yield from ctx.send(right, 0, [acc[me]], {"sig": ctx.signature})
            for step in range(n - 1):
                row = (me - step - 1) % n
                message = yield from ctx.recv(left, step)
                if step == 0:
                    ctx.check(message, left)
                reduce(acc[row], ctx.array(message, left, 0, acc[row]), out=acc[row])
                ctx.release(message)
                if step < n - 2:
                    yield from ctx.send(right, step + 1, [acc[row]])
            owned = (me + 1) % n
            yield from ctx.send(right, n, [acc[owned]])
            message = yield from ctx.recv(left, n)
            result = ctx.array(message, left, 0, acc[me]).copy()
            ctx.release(message)
        else:
            parts = {me: work[me]}

            def take(peer, message):
                parts[peer] = ctx.array(message, peer, 0, work[me])

            yield from ctx.exchange(0, lambda peer: [work[peer]], signed=True, take=take)
            result = parts[0].copy()
            for peer in range(1, n):
                reduce(result, parts[peer], out=result)
    if op == "avg":
        result /= n
    return result


# ---- broadcast ------------------------------------------------------------------------------------
def broadcast(ctx: CollectiveContext, work: np.ndarray, root: int):
    """Copy root's `work` into every rank's `work`.

    Every rank must hear from every other, or the root would finish while a rank that disagrees
    (on the root, say) raises. Direct and ring sizes take one round for it: every rank sends its
    signature to every other, and the root's messages carry the data too.
    """
    n, me = ctx.n, ctx.me
    if n == 1:
        return work
    if choose_algorithm(ctx, work.nbytes) == "shm":
        return (yield from broadcast_shm(ctx, work, root))

    def take(peer, message):
        if peer == root:
            work[...] = ctx.array(message, root, 0, work)

    yield from ctx.exchange(0, [work] if me == root else (), signed=True, take=take)
    return work


def broadcast_shm(ctx: CollectiveContext, work: np.ndarray, root: int):
    """Large buffers on one host: the signatures go round first, so that the root takes no block
    of its arena for a broadcast that then fails; then, round by round (see shm_round_elements),
    the block's offset, and a note back from each rank once it has copied the data out."""
    n, me = ctx.n, ctx.me
    yield from barrier(ctx)
    per_round = shm_round_elements(ctx, work.itemsize)
    rounds = list(enumerate(range(0, max(work.size, 1), per_round)))
    if me != root:
        for index, start in rounds:
            piece = work[start : start + per_round]
            message = yield from ctx.recv(root, 2 * index + 1)
            piece[...] = ctx.peer_block(root, (message.meta or {}).get("o", -1), piece)
            yield from ctx.send(root, 2 * index + 2)
        return work
    for index, start in rounds:
        piece = work[start : start + per_round]
        offset, block = yield from ctx.own_block(piece)
        block[...] = piece
        for peer in range(n):
            if peer != me:
                yield from ctx.send(peer, 2 * index + 1, (), {"o": offset})
        for peer in range(n):
            if peer != me:
                yield from ctx.recv(peer, 2 * index + 2)
        ctx.give_back_block(offset)
        ctx.count_shared((n - 1) * piece.nbytes)
    return work


def barrier(ctx: CollectiveContext):
    if ctx.n == 1:
        return None
    yield from ctx.exchange(0, signed=True)
    return None


__all__ = ["CollectiveContext", "guarded", "all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier",
           "REDUCTIONS", "WaitSent"]

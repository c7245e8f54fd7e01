"""What a collective algorithm (runtime/collectives.py) works with: its `CollectiveContext` (group,
message keys, signature; sending, receiving, the direct exchange, arena blocks), the choice of
algorithm by size and placement, and the rounds the shared-memory algorithms share.
"""
from __future__ import annotations

import numpy as np

from ringpipe.runtime.operations import Aborted, Cancelled, CollectiveMismatch, CommError, Recv, WaitBlock
from ringpipe.runtime.transfer import send_arrays, send_now


class CollectiveContext:
    """What an algorithm needs: its group, its message keys and its signature."""

    def __init__(self, engine, group, seq: int, epoch: int, call: int, name: str, signature: dict, config):
        self.engine, self.group, self.seq, self.epoch, self.call = engine, group, seq, epoch, call
        self.name, self.signature, self.config = name, signature, config
        self.n, self.me = len(group.ranks), group.index
        self.owned_blocks: set[int] = set()  # arena blocks taken and not yet given back

    def send(self, peer: int, step: int, arrays=(), meta=None, allow_shm=True):
        header = {"k": "coll", "g": self.group.gid, "c": self.seq, "s": step, "n": self.call}
        if meta is not None:
            header["m"] = meta
        yield from send_arrays(self.engine, self.group.ranks[peer], header, arrays, self.group.gid,
                               allow_shm and self.config.shm)

    def post(self, peer: int, step: int, arrays=(), meta=None):
        """Send without waiting. Returns the ZeroMQ tracker of a zero-copy send, whose arrays must
        not change until it is done (`yield WaitSent(tracker, ...)`), or None if nothing reads them."""
        header = {"k": "coll", "g": self.group.gid, "c": self.seq, "s": step, "n": self.call}
        if meta is not None:
            header["m"] = meta
        return send_now(self.engine, self.group.ranks[peer], header, arrays, self.group.gid, self.config.shm,
                        track=True)

    def recv(self, peer: int, step: int):
        src = self.group.ranks[peer]
        message = yield Recv((self.epoch, self.call, "coll", self.group.gid, self.seq, src, step), src)
        return message

    def exchange(self, step: int, arrays=(), meta=None, signed: bool = False, take=None):
        """The direct exchange, one message round: send to every other member (`arrays`, or
        `arrays(peer)` when each peer gets its own; inline, the sizes are small), then receive one
        message from each, in rank order. With `signed` the messages carry this call's signature
        and each one received is checked; `take(peer, message)` then sees it at once."""
        if signed:
            meta = dict(meta or (), sig=self.signature)
        per_peer = callable(arrays)
        for peer in range(self.n):
            if peer != self.me:
                yield from self.send(peer, step, arrays(peer) if per_peer else arrays, meta, allow_shm=False)
        for peer in range(self.n):
            if peer != self.me:
                message = yield from self.recv(peer, step)
                if signed:
                    self.check(message, peer)
                if take is not None:
                    take(peer, message)

    def _where(self) -> str:
        # A collective's full name already says its group ("all_reduce #3 on group w (rank 0 of 2)").
        return self.name if " on group " in self.name else f"{self.name} on group {self.group.gid}"

    def check(self, message, peer: int):
        theirs = (message.meta or {}).get("sig")
        if theirs != self.signature:
            raise CollectiveMismatch(
                f"{self._where()}: rank {self.me} called it with {describe(self.signature)}"
                f" but rank {peer} with {describe(theirs)}")

    def array(self, message, peer: int, index: int, like: np.ndarray) -> np.ndarray:
        """Array `index` of a message (inline or in the peer's arena), checked against `like`."""
        if message.shm is not None:
            arrays = [view for _, view in message.shm]
        else:
            arrays = message.inline
        if index >= len(arrays) or arrays[index].shape != like.shape or arrays[index].dtype != like.dtype:
            raise CollectiveMismatch(f"{self._where()}: rank {peer} sent a payload that "
                                     f"does not match rank {self.me}'s {like.dtype}{list(like.shape)}")
        return arrays[index]

    def release(self, message):
        if message.shm:
            for offset, _ in message.shm:
                self.engine.send(message.src, {"k": "free", "o": offset})

    def count_shared(self, nbytes: int):
        """Payload that peers read from this rank's arena counts as sent by this rank."""
        self.engine.count_sent(self.group.gid, nbytes)

    def peer_block(self, peer: int, offset: int, like: np.ndarray) -> np.ndarray:
        src = self.group.ranks[peer]
        try:
            raw = self.engine.peer_arenas[src].view(offset, like.nbytes)
        except (KeyError, ValueError) as exc:
            raise CommError(f"{self.name}: bad shared-memory block from rank {peer}: {exc}") from None
        return raw.view(like.dtype).reshape(like.shape)

    def own_block(self, like: np.ndarray):
        offset = yield WaitBlock(like.nbytes)
        self.owned_blocks.add(offset)
        return offset, self.engine.arena.view(offset, like.nbytes).view(like.dtype).reshape(like.shape)

    def give_back_block(self, offset: int):
        """Return a block once every peer is done with it (on the next engine turn: returning it may
        resume another operation, which must not run inside this one)."""
        self.owned_blocks.discard(offset)
        self.engine.call_soon(lambda: self.engine.release_block(offset))

    def drop_owned_blocks(self):
        """After a failure: blocks still owned go back at once, so that a caller who catches the
        error does not leak arena space. Every member fails the collective together (the
        signatures reach every rank, and an abort reaches every member), so no peer still needs
        them. Operations waiting for space are resumed on the next engine turn."""
        for offset in self.owned_blocks:
            self.engine.arena.free(offset)
        if self.owned_blocks:
            self.owned_blocks.clear()
            self.engine.call_soon(self.engine.grant_blocks)


def guarded(ctx: CollectiveContext, algorithm):
    """Run a collective's generator; if it fails or is closed, drop the arena blocks it holds.

    Except when it is cancelled (a member's call ended without waiting for it): a peer may still
    be reading this rank's blocks then, so they stay taken until the fence resets the arena."""
    try:
        return (yield from algorithm)
    except (Cancelled, Aborted):
        ctx.owned_blocks.clear()
        raise
    finally:
        ctx.drop_owned_blocks()


def describe(signature) -> str:
    if not isinstance(signature, dict):
        return repr(signature)
    return ", ".join(f"{k}={v}" for k, v in signature.items())


def split_bounds(length: int, parts: int) -> list[int]:
    """Boundaries of `parts` near-equal pieces of range(length)."""
    return [length * i // parts for i in range(parts + 1)]


def shm_round_elements(ctx: CollectiveContext, itemsize: int) -> int:
    """Elements of `itemsize` bytes that one shared-memory round moves: the configured round size,
    but at most a quarter of the arena, so that a buffer larger than the arena goes in rounds and
    collectives of several groups fit beside each other. Every rank's arena has the same size, so
    every rank splits the same way."""
    round_bytes = min(ctx.config.round_bytes, ctx.engine.arena.size // 4)
    return max(1, round_bytes // max(itemsize, 1))


def choose_algorithm(ctx: CollectiveContext, nbytes: int) -> str:
    forced = ctx.config.algorithm
    if forced != "auto":
        if forced == "shm" and not ctx.group.shm:
            return "ring"
        return forced
    if nbytes <= ctx.config.direct_max_bytes:
        return "direct"
    if ctx.group.shm:
        return "shm"
    return "ring"


def exchange_blocks(ctx, step, offset, block, with_signature):
    """Tell every peer where this rank's block is; returns every peer's block (by index)."""
    blocks = {ctx.me: block}

    def take(peer, message):
        blocks[peer] = ctx.peer_block(peer, (message.meta or {}).get("o", -1), block)

    yield from ctx.exchange(step, meta={"o": offset}, signed=with_signature, take=take)
    return blocks


def notify_all(ctx, step):
    """A round of empty messages: returns once every peer has reached `step`."""
    yield from ctx.exchange(step)


__all__ = ["CollectiveContext", "guarded", "describe", "split_bounds", "shm_round_elements", "choose_algorithm",
           "exchange_blocks", "notify_all"]

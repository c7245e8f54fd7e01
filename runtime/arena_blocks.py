"""The engine's shared-memory bookkeeping: blocks of this rank's arena taken by operations and
given back (by its own operations, by peers' "free" messages, or by receivers passing the ring
slots that name them: runtime/shm_p2p.py), operations waiting for space, and the checks on
references into a peer's arena. Part of `Engine` (see engine.py).
"""
from __future__ import annotations

import math

from ringpipe.runtime import wire


class ArenaBookkeeping:
    """Mixed into `Engine`; uses its `arena`, `peer_arenas`, `shm_peers`, `block_waits`, `rings`,
    `send` and `_resume`."""

    def alloc_block(self, nbytes: int) -> int | None:
        """A block of this rank's arena, or None while it is full. The pair rings give their blocks
        back lazily (at their next send), so when the arena is full they are asked first."""
        offset = self.arena.alloc(nbytes)
        if offset is None and self.rings is not None and self.rings.reclaim():
            offset = self.arena.alloc(nbytes)
        return offset

    def place_in_arena(self, arrays) -> list | None:
        """Copy `arrays` into fresh blocks of this rank's arena, from any thread; returns their
        references ([offset, dtype, shape] each, as a message's "shm" header carries them), or None
        when the arena has no room for all of them right now (nothing is kept then)."""
        refs = []
        for array in arrays:
            offset = self.alloc_block(array.nbytes)
            if offset is None:
                for ref in refs:
                    self.arena.free(ref[0])
                return None
            self.arena.view(offset, array.nbytes).view(array.dtype).reshape(array.shape)[...] = array
            refs.append([offset, array.dtype.str, list(array.shape)])
        return refs

    def release_block(self, offset: int):
        """Return a block of this worker's arena and hand free space to operations waiting."""
        self.arena.free(offset)
        self.grant_blocks()

    def grant_blocks(self):
        """Resume operations waiting for arena space, in order, while it lasts."""
        while self.block_waits:
            op, nbytes = self.block_waits[0]
            block = self.alloc_block(nbytes)
            if block is None:
                return
            self.block_waits.popleft()
            self._resume(op, block)

    def _free_unread(self, message):
        """A message dropped unread still gives the sender's arena blocks back."""
        if message.shm:
            for offset, _ in message.shm:
                self.send(message.src, {"k": "free", "o": offset})

    def _validate_shm(self, src, refs):
        arena = self.peer_arenas.get(src)
        if arena is None or not isinstance(refs, list):
            raise wire.WireError(f"shared-memory reference from rank {src}, which has no mapped arena")
        out = []
        for ref in refs:
            if not (isinstance(ref, list) and len(ref) == 3 and isinstance(ref[0], int)):
                raise wire.WireError("bad shared-memory reference")
            offset, dtype_str, shape = ref
            _, dtype, shape = wire._array_spec(wire.msgpack.packb([0, dtype_str, shape]))
            nbytes = math.prod(shape) * dtype.itemsize
            try:
                view = arena.view(offset, nbytes)
            except ValueError as exc:
                raise wire.WireError(str(exc)) from None
            out.append((offset, view.view(dtype).reshape(shape)))
        return out


__all__ = ["ArenaBookkeeping"]

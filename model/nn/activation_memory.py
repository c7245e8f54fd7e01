"""`ActivationMemory`: the bytes of activations a model caches between forward and backward.

Every forward cache is `hold`-ed and every backward `release`s it, so the memory that recompute and
pipeline schedules save is measured, not guessed.
"""
from __future__ import annotations

import threading


class ActivationMemory:
    """Bytes of activations cached between forward and backward: live now, and peak since reset."""

    def __init__(self):
        self.live_bytes = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()  # batch shards run on several threads
        # id(cache) -> bytes counted by hold, so that release need not walk the cache again (a
        # walk that holds the GIL against the other batch shard). Ids only, to keep no cache alive.
        self._held = {}

    def reset(self):
        self.live_bytes = self.peak_bytes = 0
        self._held.clear()

    @staticmethod
    def nbytes(cache) -> int:
        """Bytes of the distinct buffers in a (nested dict/tuple/list of) arrays."""
        buffers = {}
        stack = [cache]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif hasattr(item, "nbytes"):
                while item.base is not None:  # count each buffer once, through its views
                    item = item.base
                buffers[id(item)] = item.nbytes
        return sum(buffers.values())

    def hold(self, cache):
        nbytes = self.nbytes(cache)
        with self._lock:
            self._held[id(cache)] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return cache

    def release(self, cache):
        with self._lock:
            nbytes = self._held.pop(id(cache), None)
        if nbytes is None:  # never held (or reset since)
            nbytes = self.nbytes(cache)
        with self._lock:
            self.live_bytes -= nbytes

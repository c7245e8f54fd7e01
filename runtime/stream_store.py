"""Streaming (non-temporal) stores into a same-host group channel's buffers (runtime/csrc/stream_store.h
has the why and the measurements): from which size a copy that peers read next goes to memory
instead of staying modified in this core's cache.

`stream_min_bytes(n)`: the threshold for a group of `n` members on this host, alike for every
channel of this process: RINGPIPE_SHM_STREAM_MIN (bytes, read once per group size; "0" or "off": never stream)
or DEFAULT_MIN_BYTES while the members can have a core each. With more members than cores, a peer
often runs on this same core next, where a plain store leaves the data in the cache it reads from:
no streaming there unless RINGPIPE_SHM_STREAM_MIN asks for it. A store changes no value, so members
with different thresholds still agree bitwise; only speed depends on it.

`copy(dst, src)`: the Python paths' copy into a buffer (runtime/shm_collectives.py), streamed from
the threshold through the C helper where it builds, else NumPy's copy.
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from ringpipe.runtime import c_library

# Measured with the channel's own rounds (2 ranks, 2 cores): streaming wins from 4 KiB (one-round
# all_reduce 4 KiB 2.3 -> 1.9 us, 16 KiB 8 -> 5 us); at 1 KiB the fence costs what it saves.
DEFAULT_MIN_BYTES = 4 << 10


def _setting() -> int | None:
    """RINGPIPE_SHM_STREAM_MIN as bytes (0: never), or None when unset. Raises ValueError naming the
    variable for anything else."""
    text = os.environ.get("RINGPIPE_SHM_STREAM_MIN", "").strip().lower()
    if not text:
        return None
    if text == "off":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"RINGPIPE_SHM_STREAM_MIN={text!r}: expected a byte count or 'off'") from None
    if value < 0:
        raise ValueError(f"RINGPIPE_SHM_STREAM_MIN={value}: expected a byte count >= 0 or 'off'")
    return value


@functools.lru_cache(maxsize=None)
def stream_min_bytes(n: int) -> int:
    """Bytes from which a copy into a buffer of a channel of `n` members streams (0: never). Raises
    ValueError naming RINGPIPE_SHM_STREAM_MIN when it holds neither a byte count nor "off"."""
    setting = _setting()
    if setting is not None:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return DEFAULT_MIN_BYTES if n <= cores else 0


_library: list = []


def _copy_function():
    if not _library:
        try:
            function = c_library.build("stream_store", sources=["stream_store.c"]).rp_stream_copy_fenced
            function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], None
            _library.append(function)
        except Exception:  # noqa: BLE001 - no compiler: NumPy's copy (a plain store)
            _library.append(None)
    return _library[0]


def copy(dst: np.ndarray, src: np.ndarray, stream_min: int) -> None:
    """dst[...] = src, streamed when both are C-contiguous, of one dtype and shape, and at least
    `stream_min` > 0 bytes."""
    function = _copy_function() if 0 < stream_min <= src.nbytes else None
    if (function is None or dst.dtype != src.dtype or dst.shape != src.shape or not src.flags.c_contiguous
            or not dst.flags.c_contiguous):
        dst[...] = src
        return
    function(dst.ctypes.data, src.ctypes.data, src.nbytes)


__all__ = ["stream_min_bytes", "copy", "DEFAULT_MIN_BYTES"]

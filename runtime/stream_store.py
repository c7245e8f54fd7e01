"""Streaming (non-temporal) stores into a same-host group channel's buffers (runtime/csrc/stream_store.h
has the why and the measurements): from which size a copy that peers read next goes to memory
instead of staying modified in this core's cache.

`stream_min_bytes(n, reduce_bytes=None)`: the threshold where this job has `n` ranks on this host
(not a group's members: the ranks of other groups share the cores too), alike for every channel of
this process: RINGPIPE_SHM_STREAM_MIN (bytes; "0" or "off": never stream) or DEFAULT_MIN_BYTES while
those ranks can have a core each; 0 for a reduction above `reduce_max_bytes()`. With more ranks than
cores, a peer
often runs on this same core next, where a plain store leaves the data in the cache it reads from:
no streaming there unless RINGPIPE_SHM_STREAM_MIN asks for it. A store changes no value, so members
with different thresholds still agree bitwise; only speed depends on it.

A reduction larger than `reduce_max_bytes()` (an all_reduce's buffer rounds, a reduce_scatter's
one-call round up to 1 MiB; not the single-copy path) streams nothing: its rounds write and read every
byte of the operation within microseconds on both sides, and once that no longer fits in a core's
private cache the lines a plain store leaves go to the shared cache, where the peer reads them next;
streamed, they go to memory and come back from there. Measured (2 ranks, AMD EPYC, 1 MiB L2 per core,
32 MiB shared L3; `ringpipe bench collectives --world-size 2 --ops all_reduce`, streamed against not,
three interleaved pairs): 64 KiB 14 against 22 µs, 256 KiB 31 against 44, but 384 KiB 65 against 45,
1 MiB 123 against 70, 4 MiB 480 against 360 and 64 MiB 13.8 against 12.2 ms. Broadcast, all_gather
and sendrecv stream at every size: their reader takes each line once from the writer's cache
otherwise, and how fast that is depends on where the VM's two vCPUs sit at the moment. Session 11
measured broadcast and sendrecv 2.5-7x faster streamed from 64 KiB to 1 MiB (broadcast 1 MiB 51-70
against 466-477 us); session 12, on the same kind of VM, measured plain stores 1.3-2x faster from
512 KiB (broadcast 1 MiB 44-50 against 60-74 us, sendrecv 1 MiB 66-155 against 206-231, three
pairs): streaming is the choice that is never far from the best.

`copy(dst, src)`: the Python paths' copy into a buffer (runtime/shm_collectives.py), streamed from
the threshold through the C helper where it builds, else NumPy's copy.
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from ringpipe.runtime import c_library, env_setting, shm_wait

# Measured with the channel's own rounds (2 ranks, 2 cores): streaming wins from 4 KiB (one-round
# all_reduce 4 KiB 2.3 -> 1.9 us, 16 KiB 8 -> 5 us); at 1 KiB the fence costs what it saves.
DEFAULT_MIN_BYTES = 4 << 10
# Where the core's private (level 2) cache cannot be read: the limit measured with a 1 MiB one.
FALLBACK_REDUCE_MAX_BYTES = 256 << 10
# More bytes than any buffer: "no limit", and what a larger setting becomes (the C helpers take the
# thresholds as 64-bit words).
NO_LIMIT = 1 << 62


def _bytes_setting(name: str, off: int) -> int | None:
    """Variable `name` as bytes (at most NO_LIMIT), `off` for "off", None when unset. Raises ValueError
    naming it for anything else."""
    value = env_setting.setting(name)
    if value == env_setting.OFF:
        return off
    return None if value is None else min(value, NO_LIMIT)


def stream_min_bytes(n: int, reduce_bytes: int | None = None) -> int:
    """Bytes from which a copy into a buffer of a channel of `n` members streams (0: never); for a
    reduction of `reduce_bytes` in all, 0 above `reduce_max_bytes()`. Raises ValueError naming
    RINGPIPE_SHM_STREAM_MIN or RINGPIPE_SHM_STREAM_REDUCE_MAX when it holds neither a byte count nor
    "off"."""
    if reduce_bytes is not None and reduce_bytes > reduce_max_bytes():
        return 0
    return _min_bytes(n)


def private_cache_bytes(cpu: int = 0) -> int | None:
    """The size of CPU `cpu`'s level-2 cache when no other CPU shares it (Linux sysfs), else None."""
    root = f"/sys/devices/system/cpu/cpu{cpu}/cache"

    def read(index: str, name: str) -> str:
        with open(os.path.join(root, index, name)) as f:
            return f.read().strip()

    try:
        for index in sorted(os.listdir(root)):
            if not index.startswith("index") or read(index, "level") != "2":
                continue
            if read(index, "shared_cpu_list") != str(cpu):
                return None  # (shared by several CPUs: not a core's own)
            text = read(index, "size").upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


@functools.lru_cache(maxsize=None)
def reduce_max_bytes() -> int:
    """Bytes of an all_reduce up to which its copies for peers stream: RINGPIPE_SHM_STREAM_REDUCE_MAX
    (bytes; "off": no limit), else a quarter of the core's private cache (the operation, this rank's
    buffer and the peers' parts it reads stay in it), else FALLBACK_REDUCE_MAX_BYTES. Raises
    ValueError naming the variable for anything else."""
    value = _bytes_setting("RINGPIPE_SHM_STREAM_REDUCE_MAX", off=NO_LIMIT)
    if value is not None:
        return value
    private = private_cache_bytes(min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
    return private // 4 if private else FALLBACK_REDUCE_MAX_BYTES


@functools.lru_cache(maxsize=None)
def _min_bytes(n: int) -> int:
    setting = _bytes_setting("RINGPIPE_SHM_STREAM_MIN", off=0)
    if setting is not None:
        return setting
    return DEFAULT_MIN_BYTES if n <= shm_wait.cores() else 0


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


__all__ = ["stream_min_bytes", "reduce_max_bytes", "private_cache_bytes", "copy", "DEFAULT_MIN_BYTES",
           "FALLBACK_REDUCE_MAX_BYTES", "NO_LIMIT"]

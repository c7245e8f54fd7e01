"""Streaming (non-temporal) stores into a same-host group channel's buffers (runtime/csrc/stream_store.h
has the why and the measurements): from which size a copy that peers read next goes to memory
instead of staying modified in this core's cache.

`stream_min_bytes(n, op_bytes=None)`: the threshold where this job has `n` ranks on this host (not a
group's members: the ranks of other groups share the cores too), alike for every channel of this
process: RINGPIPE_SHM_STREAM_MIN (bytes; "0" or "off": never stream) or DEFAULT_MIN_BYTES while those
ranks can have a core each; 0 for an operation of `op_bytes` above `max_bytes()`. With more ranks than
cores, a peer often runs on this same core next, where a plain store leaves the data in the cache it
reads from: no streaming there unless RINGPIPE_SHM_STREAM_MIN asks for it. A store changes no value,
so members with different thresholds still agree bitwise; only speed depends on it.

An operation larger than `max_bytes()` (RINGPIPE_SHM_STREAM_MAX, default a quarter of the core's
private cache) streams nothing: once what it writes and reads no longer fits in a core's private
cache, the lines a plain store leaves go to the shared cache, where the peer reads them next;
streamed, they go to memory and come back from there. Measured on 2 ranks, AMD EPYC VM, 1 MiB L2 per
core, 32 MiB shared L3 (`ringpipe bench collectives --world-size 2`, streamed against not, three
interleaved pairs of 5-round medians):
- all_reduce: 64 KiB 14 against 22 µs, 256 KiB 31 against 44, but 384 KiB 65 against 45, 1 MiB 123
  against 70, 4 MiB 480 against 360, 64 MiB 13.8 against 12.2 ms;
- broadcast: 64 KiB 7.7-10.8 against 12.1-14.6 µs, 256 KiB 19.5-27.0 against 30.2-31.9, but 512 KiB
  63-66 against 46-48, 1 MiB 60-74 against 41-44, 2 MiB 181-192 against 134-147;
- sendrecv: 256 KiB 36-48 against 49-54 µs, 512 KiB 77-101 against 73-75, 1 MiB 206-231 against
  84-136;
- all_gather (the result's bytes): 256 KiB 19-25 against 24-30 µs, 512 KiB to 2 MiB within noise.

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
FALLBACK_MAX_BYTES = 256 << 10
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


def stream_min_bytes(n: int, op_bytes: int | None = None) -> int:
    """Bytes from which a copy into a buffer of a channel streams, in a job with `n` ranks on this
    host (0: never); for an operation of `op_bytes` (what this rank writes or reduces for it), 0
    above `max_bytes()`. Raises ValueError naming RINGPIPE_SHM_STREAM_MIN or RINGPIPE_SHM_STREAM_MAX
    when it holds neither a byte count nor "off"."""
    if op_bytes is not None and op_bytes > max_bytes():
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
def max_bytes() -> int:
    """Bytes of an operation up to which its copies for peers stream: RINGPIPE_SHM_STREAM_MAX (bytes;
    "off": no limit), else a quarter of the core's private cache (the operation, this rank's buffer
    and what it reads of the peers' stay in it), else FALLBACK_MAX_BYTES. Raises ValueError naming
    the variable for anything else."""
    value = _bytes_setting("RINGPIPE_SHM_STREAM_MAX", off=NO_LIMIT)
    if value is not None:
        return value
    private = private_cache_bytes(min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
    return private // 4 if private else FALLBACK_MAX_BYTES


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


__all__ = ["stream_min_bytes", "max_bytes", "private_cache_bytes", "copy", "DEFAULT_MIN_BYTES",
           "FALLBACK_MAX_BYTES", "NO_LIMIT"]

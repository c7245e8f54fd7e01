"""The reduction step of the same-host collectives: `reduce_into(reduce, inputs, out, copy, divisor)`,
and `c_sum(dtype)` for callers that know their arrays' addresses.

Sums of float32/float64 go through a small C kernel (runtime/csrc/reduce_sum.c, built on first use,
runtime/c_library.py): one pass over every input, writing the result to `out` and, when asked, to
`copy` as well, and dividing for an average, instead of NumPy's pass per input, a pass for the
division and a pass for the copy. Everything else, and every machine without a C compiler, uses
NumPy, with bitwise the same results (the kernel adds in the same order). `RINGPIPE_REDUCE=numpy`
(read at import; `set_mode` in tests) forces NumPy, so the fallback stays tested.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from ringpipe.runtime import c_library

# The dtype and reduction codes of csrc/reduce_loops.h, for every C helper that reduces (the
# latency path, runtime/shm_small.py, and the chunk loop, runtime/shm_reduce_chunks.py).
C_DTYPES = {np.dtype(name): code for code, name in enumerate(["<f4", "<f8", "i1", "<i2", "<i4", "<i8", "u1", "<u2",
                                                               "<u4", "<u8"])}
C_OPS = {np.add: 0, np.maximum: 1, np.minimum: 2}

_lock = threading.Lock()
_kernels: dict = {}  # "lib" -> {dtype: C function} or None when it cannot be built
_error: list = []  # why the C kernel is unavailable, once known
_settings = {"numpy": os.environ.get("RINGPIPE_REDUCE", "c").lower() == "numpy"}


def _c_kernels() -> dict | None:
    with _lock:
        if "lib" not in _kernels:
            try:
                lib = c_library.build("reduce_sum")
            except Exception as exc:  # noqa: BLE001 - no compiler, a failed build: NumPy then
                _error.append(str(exc).replace("\n", " "))
                _kernels["lib"] = None
            else:
                table = {}
                for dtype, suffix, ctype in ((np.dtype(np.float32), "f32", ctypes.c_float),
                                             (np.dtype(np.float64), "f64", ctypes.c_double)):
                    function = getattr(lib, f"rp_sum_{suffix}")
                    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctype, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int]
                    function.restype = None
                    table[dtype] = function
                _kernels["lib"] = table
        return _kernels["lib"]


def set_mode(mode: str) -> None:
    """"c" (the kernel where it builds) or "numpy" (always NumPy), for this process."""
    if mode not in ("c", "numpy"):
        raise ValueError(f"reduce mode {mode!r}: expected 'c' or 'numpy'")
    _settings["numpy"] = mode == "numpy"


def mode() -> str:
    """"c" when sums use the C kernel here, else "numpy"."""
    return "numpy" if _settings["numpy"] or _c_kernels() is None else "c"


def unavailable_reason() -> str | None:
    """Why the C kernel cannot be used here (None when it can)."""
    return None if _c_kernels() is not None else (_error[0] if _error else "unavailable")


def c_sum(dtype, reduce=np.add):
    """For a sum of `dtype`: `sum(addresses, count, divisor, out, copy, stream)`, the C kernel taking
    the inputs' addresses (ints: asking NumPy for them costs microseconds each) and writing what
    `reduce_into` writes (`copy` 0 for none; `stream`: `out` is a shared buffer that peers read next,
    written with streaming stores, runtime/stream_store.py); None where `reduce_into` must do it."""
    if reduce is not np.add or _settings["numpy"]:
        return None
    kernels = _c_kernels()
    kernel = kernels.get(np.dtype(dtype)) if kernels is not None else None
    if kernel is None:
        return None

    def run(addresses, count: int, divisor: int, out: int, copy: int = 0, stream: bool = False):
        kernel((ctypes.c_void_p * len(addresses))(*addresses), len(addresses), count, divisor, out, copy or None,
               int(stream))

    return run


def reduce_into(reduce, inputs: list, out: np.ndarray, copy: np.ndarray | None = None, divisor: int = 0,
                stream: bool = False):
    """out = ((inputs[0] ⊕ inputs[1]) ⊕ inputs[2]) ⊕ ... for the ufunc `reduce` (np.add, np.maximum,
    np.minimum), then divided by `divisor` when it is non-zero; also written to `copy` when given.

    All arrays are 1-D of one dtype and length, at least two inputs. `out` may be inputs[0] or
    inputs[1] (not a later input: it holds the partial sum before those are added); `copy` may be
    any input (it is written last). `stream`: `out` is a shared buffer peers read next (see c_sum;
    NumPy's path stores plainly)."""
    kernel = c_sum(out.dtype, reduce)
    if kernel is not None and all(a.flags.c_contiguous for a in inputs):
        kernel([a.ctypes.data for a in inputs], out.size, divisor, out.ctypes.data,
               0 if copy is None else copy.ctypes.data, stream)
        return out
    reduce(inputs[0], inputs[1], out=out)
    for other in inputs[2:]:
        reduce(out, other, out=out)
    if divisor:
        np.divide(out, divisor, out=out)
    if copy is not None:
        np.copyto(copy, out)
    return out


__all__ = ["reduce_into", "c_sum", "mode", "set_mode", "unavailable_reason", "C_DTYPES", "C_OPS"]

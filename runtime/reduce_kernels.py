"""The reduction step of the same-host collectives: `reduce_into(reduce, inputs, out, copy, divisor)`.

Sums of float32/float64 go through a small C kernel (runtime/csrc/reduce_sum.c, built on first use,
runtime/c_library.py): one pass over every input, writing the result to `out` and, when asked, to
`copy` as well, and dividing for an average, instead of NumPy's pass per input, a pass for the
division and a pass for the copy. Everything else, and every machine without a C compiler, uses
NumPy, with bitwise the same results (the kernel adds in the same order). `RINGPIPE_REDUCE=numpy`
forces NumPy (the fallback stays tested).
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from ringpipe.runtime import c_library

_lock = threading.Lock()
_kernels: dict = {}  # "lib" -> {dtype: C function} or None when it cannot be built
_error: list = []  # why the C kernel is unavailable, once known


def _c_kernels() -> dict | None:
    with _lock:
        if "lib" not in _kernels:
            try:
                lib = c_library.build("reduce_sum", ("-O3", "-fPIC", "-shared"))
            except Exception as exc:  # noqa: BLE001 - no compiler, a failed build: NumPy then
                _error.append(str(exc).replace("\n", " "))
                _kernels["lib"] = None
            else:
                table = {}
                for dtype, suffix, ctype in ((np.dtype(np.float32), "f32", ctypes.c_float),
                                             (np.dtype(np.float64), "f64", ctypes.c_double)):
                    function = getattr(lib, f"rp_sum_{suffix}")
                    function.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctype, ctypes.c_void_p,
                                         ctypes.c_void_p]
                    function.restype = None
                    table[dtype] = function
                _kernels["lib"] = table
        return _kernels["lib"]


def mode() -> str:
    """"c" when sums use the C kernel here, else "numpy"."""
    if os.environ.get("RINGPIPE_REDUCE", "c").lower() == "numpy":
        return "numpy"
    return "c" if _c_kernels() is not None else "numpy"


def unavailable_reason() -> str | None:
    """Why the C kernel cannot be used here (None when it can)."""
    return None if _c_kernels() is not None else (_error[0] if _error else "unavailable")


def reduce_into(reduce, inputs: list, out: np.ndarray, copy: np.ndarray | None = None, divisor: int = 0):
    """out = ((inputs[0] ⊕ inputs[1]) ⊕ inputs[2]) ⊕ ... for the ufunc `reduce` (np.add, np.maximum,
    np.minimum), then divided by `divisor` when it is non-zero; also written to `copy` when given.

    All arrays are 1-D of one dtype and length, at least two inputs. `out` may be inputs[0] or
    inputs[1] (not a later input: it holds the partial sum before those are added); `copy` may be
    any input (it is written last)."""
    kernel = None
    if reduce is np.add and os.environ.get("RINGPIPE_REDUCE", "c").lower() != "numpy":
        kernels = _c_kernels()
        kernel = kernels.get(out.dtype) if kernels is not None else None
    if kernel is not None and all(a.flags.c_contiguous for a in inputs):
        pointers = (ctypes.c_void_p * len(inputs))(*[a.ctypes.data for a in inputs])
        kernel(pointers, len(inputs), out.size, divisor, out.ctypes.data, None if copy is None else copy.ctypes.data)
        return out
    reduce(inputs[0], inputs[1], out=out)
    for other in inputs[2:]:
        reduce(out, other, out=out)
    if divisor:
        np.divide(out, divisor, out=out)
    if copy is not None:
        np.copyto(copy, out)
    return out


__all__ = ["reduce_into", "mode", "unavailable_reason"]

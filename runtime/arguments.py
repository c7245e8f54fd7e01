"""Argument checks for the communicator's operations, made before an operation takes its number.

A collective is numbered per group in call order (runtime/group_state.py), and its members match
each other by that number. An argument found bad only after the number was taken (a read-only
array written into at the end, a dtype the reduction cannot add) leaves the ranks out of step: the
peers' next, unrelated collective then fails as a mismatch. So every entry point checks what it
can here first: the rank raises one line naming the operation, the rank, the argument and why, and
its peers see it missing (a timeout naming it, or the call's abort), never a later mismatch.
"""
from __future__ import annotations

import math

import numpy as np

from ringpipe.runtime.array_module import is_device_array
from ringpipe.runtime.collectives import REDUCTIONS

NUMERIC_KINDS = "biufc"  # bool, signed and unsigned integers, floats, complex
REDUCTION_OPS = tuple(sorted(REDUCTIONS))


def check_operation(what: str, rank: int, x, in_place: bool = False, op=None, timeout=None) -> None:
    """All of `what`'s checks (check_array, check_reduction when `op` is given, check_timeout); the
    common case (a numeric NumPy array, writable if written into) costs one call: this runs before
    every collective, small ones included."""
    if timeout is None and type(x) is np.ndarray:
        kind = x.dtype.kind
        if (kind in NUMERIC_KINDS and (op is None or (op in REDUCTIONS and (op != "avg" or kind in "fc")))
                and (not in_place or x.flags.writeable)):
            return
    check_array(what, rank, x, in_place=in_place)
    if op is not None:
        check_reduction(what, rank, op, x)
    check_timeout(what, rank, timeout)


def check_array(what: str, rank: int, x, name: str = "x", in_place: bool = False) -> None:
    """Raise TypeError / ValueError unless `x` can be `what`'s argument `name` on `rank`.

    `in_place`: the operation writes its result into `x` (all_reduce, broadcast, recv's `out`), so
    `x` must be a writable NumPy array or a CuPy array; otherwise anything NumPy turns into a
    numeric array is accepted (lists, scalars). Numeric means bool, integer, float or complex."""
    if type(x) is np.ndarray and x.dtype.kind in NUMERIC_KINDS and (x.flags.writeable or not in_place):
        return  # the common case, cheaply
    if is_device_array(x):
        dtype = np.dtype(x.dtype)
    elif isinstance(x, np.ndarray):
        dtype = x.dtype
        if in_place and not x.flags.writeable:
            raise ValueError(f"{what}: rank {rank}'s {name} is read-only, and {what} writes its result into "
                             f"it; pass a writable array (e.g. {name}.copy())")
    elif in_place:
        raise TypeError(f"{what}: rank {rank}'s {name} is a {type(x).__name__}, and {what} writes its result "
                        f"into it; pass a NumPy or CuPy array (e.g. np.array({name}))")
    else:
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what}: rank {rank}'s {name} ({type(x).__name__}) is not an array: {exc}") from None
    if dtype.kind not in NUMERIC_KINDS:
        raise TypeError(f"{what}: rank {rank}'s {name} has dtype {dtype}, which is not numeric "
                        "(bool, integer, float or complex)")


def check_reduction(what: str, rank: int, op, x) -> None:
    """Raise ValueError for an unknown reduction `op`, TypeError for "avg" of a non-floating `x`."""
    if op not in REDUCTION_OPS:
        raise ValueError(f"{what}: rank {rank}'s reduction op {op!r} is unknown; expected one of {list(REDUCTION_OPS)}")
    if op == "avg":
        kind = np.dtype(x.dtype).kind if hasattr(x, "dtype") else np.asarray(x).dtype.kind
        if kind not in "fc":
            raise TypeError(f"{what}: rank {rank}'s op 'avg' needs a floating dtype, got "
                            f"{getattr(x, 'dtype', None) or np.asarray(x).dtype}")


def check_timeout(what: str, rank: int, timeout) -> None:
    """Raise ValueError unless `timeout` is None (the communicator's) or a positive number of seconds."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 or math.isnan(timeout):
        raise ValueError(f"{what}: rank {rank}'s timeout must be a positive number of seconds, got {timeout!r}")


__all__ = ["check_operation", "check_array", "check_reduction", "check_timeout", "NUMERIC_KINDS", "REDUCTION_OPS"]

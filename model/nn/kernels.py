"""Fused C kernels for the element-wise ops of a training step on the CPU (model/nn/csrc/).

`model.nn.ops` calls these for C-contiguous float32/float64 NumPy arrays when the library is
available, and its own NumPy code otherwise (CuPy arrays, no C compiler, RINGPIPE_KERNELS=numpy).
The NumPy code is the reference: tests check both paths against each other and both against
finite differences.

The library is compiled on first use with the machine's C compiler (`$CC`, else `cc`) for the
machine's own CPU (-march=native), and cached under `$RINGPIPE_CACHE` (default
`~/.cache/ringpipe`) in a file named by a hash of the sources, flags and CPU, so a home directory
shared between different machines keeps one build per kind of CPU. Several processes starting at
once compile it once: the others wait on a file lock (bounded) and load the result. Any failure
leaves the NumPy path in place and is reported by `status()`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ringpipe.runtime.c_library import cache_dir  # one cache for every C build

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("kernels.c", "ops_impl.h")
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
         "-Wno-psabi"]
NATIVE = ["-march=native"]
BUILD_TIMEOUT_S = 120.0  # compiling takes about a second; waiting on another process included

_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_lock = threading.Lock()
_library = None
_tried = False
_error = None  # why the library is not in use (None while it is, or before the first try)

# Off with RINGPIPE_KERNELS=numpy; tests switch it with `use_kernels(False)`.
enabled = os.environ.get("RINGPIPE_KERNELS", "c").lower() not in ("numpy", "0", "off")


def use_kernels(on: bool) -> bool:
    """Turn the C kernels on or off for this process; returns the previous setting."""
    global enabled
    previous, enabled = enabled, bool(on)
    return previous


def status() -> str:
    """'c' when the kernels are in use, else 'numpy (<reason>)'."""
    if not enabled:
        return "numpy (turned off)"
    if library() is None:
        return f"numpy ({_error})"
    return "c"


def _cpu_signature() -> str:
    """What -march=native depends on: the architecture and, on Linux, the CPU's feature flags."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                if len(parts) >= 3:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(target: Path, compiler: str) -> None:
    """Compile into a temporary file beside `target`, then rename: readers never see half a
    library. Tries -march=native first, then without it (compilers that lack the flag)."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        last = None
        for extra in (NATIVE, []):
            command = [compiler, *FLAGS, *extra, "-o", tmp, str(SOURCE_DIR / "kernels.c"), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=BUILD_TIMEOUT_S)
            if result.returncode == 0:
                os.replace(tmp, target)
                return
            last = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise RuntimeError(f"{compiler} failed: {last[0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _target() -> Path:
    """Where the build for these sources, flags and CPU is cached."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(FLAGS + NATIVE).encode())
    digest.update(_cpu_signature().encode())
    return cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"


def is_built() -> bool:
    """True when `library()` will not compile: loaded already, or the build is in the cache."""
    return _tried or _target().exists()


def _load():
    import fcntl  # POSIX only: elsewhere the NumPy path stays, with this import error as the reason

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    target = _target()
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        with open(directory / "build.lock", "w") as lock_file:
            deadline = time.monotonic() + BUILD_TIMEOUT_S
            while True:  # a bounded wait for a process that is compiling right now
                try:
                    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"timed out waiting for the build lock in {directory}")
                    time.sleep(0.05)
            try:
                if not target.exists():
                    _build(target, compiler)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
    return _bind(ctypes.CDLL(str(target)))


def _bind(lib):
    """Declare every kernel's signature (ctypes would otherwise guess, and truncate int64s)."""
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    signatures = {
        "layernorm_forward": ([p, p, p, p, p, p, i64, i64, f64], None),
        "layernorm_backward": ([p, p, p, p, p, p, p, i64, i64], None),
        "gelu_forward": ([p, p, p, i64, f64, f64], None),
        "gelu_backward": ([p, p, p, p, i64, f64, f64], None),
        "causal_softmax_forward": ([p, i64, i64, i64, i64, f64], None),
        "causal_softmax_backward": ([p, p, i64, i64, i64, i64, f64], None),
        "attention_forward": ([p, p, p, p, p, i64, i64, i64, i64, f64], None),
        "attention_backward": ([p, p, p, p, p, p, i64, i64, i64, i64, f64], None),
        "cross_entropy_forward": ([p, p, p, i64, i64, i64], i64),
        "adamw_update": ([p, p, p, p, p, i64, f64, f64, f64, f64, f64, f64], None),
    }
    for suffix in _DTYPES.values():
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes, function.restype = argtypes, restype
    return lib


def library():
    """The loaded library, or None when it cannot be built here (reason in `status()`)."""
    global _library, _tried, _error
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load()
            except Exception as exc:  # any failure: keep the NumPy path, remember why
                _error = f"C kernels unavailable: {exc}".replace("\n", " ")
            _tried = True
    return _library


def usable(*arrays) -> bool:
    """True when the kernels can take these arrays: NumPy, one float dtype, C-contiguous."""
    if not enabled or (_library is None and (_tried or library() is None)):
        return False
    dtype = arrays[0].dtype
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != dtype or not a.flags.c_contiguous:
            return False
    return dtype in _DTYPES


def _fn(name, dtype):
    return getattr(_library, f"{name}_{_DTYPES[dtype]}")


def _ptr(a) -> int:
    return a.ctypes.data


# ----------------------------------------------------------------------------- wrappers
# Each takes arrays for which `usable` is true and allocates its outputs.

def layernorm_forward(x2d, weight, bias, eps):
    N, C = x2d.shape
    out, xhat = np.empty_like(x2d), np.empty_like(x2d)
    rstd = np.empty((N, 1), x2d.dtype)
    _fn("layernorm_forward", x2d.dtype)(_ptr(x2d), _ptr(weight), _ptr(bias), _ptr(out),
                                        _ptr(xhat), _ptr(rstd), N, C, eps)
    return out, xhat, rstd


def layernorm_backward(dout2d, xhat, rstd, weight):
    N, C = dout2d.shape
    dx = np.empty_like(dout2d)
    dweight, dbias = np.empty(C, dout2d.dtype), np.empty(C, dout2d.dtype)
    _fn("layernorm_backward", dout2d.dtype)(_ptr(dout2d), _ptr(xhat), _ptr(rstd), _ptr(weight),
                                            _ptr(dx), _ptr(dweight), _ptr(dbias), N, C)
    return dx, dweight, dbias


def gelu_forward(x, scale, cubic):
    out, sig = np.empty_like(x), np.empty_like(x)
    _fn("gelu_forward", x.dtype)(_ptr(x), _ptr(out), _ptr(sig), x.size, scale, cubic)
    return out, sig


def gelu_backward(dout, x, sig, scale, cubic):
    dx = np.empty_like(dout)
    _fn("gelu_backward", dout.dtype)(_ptr(dout), _ptr(x), _ptr(sig), _ptr(dx), dout.size,
                                     scale, cubic)
    return dx


def causal_softmax_forward(scores, query_offset, scale):
    """In place on scores (..., Tq, Tk); returns it."""
    Tq, Tk = scores.shape[-2:]
    _fn("causal_softmax_forward", scores.dtype)(_ptr(scores), scores.size // (Tq * Tk), Tq, Tk,
                                                query_offset, scale)
    return scores


def causal_softmax_backward(dprobs, probs, query_offset, scale):
    """In place on dprobs (..., Tq, Tk); returns it."""
    Tq, Tk = probs.shape[-2:]
    _fn("causal_softmax_backward", probs.dtype)(_ptr(dprobs), _ptr(probs),
                                                probs.size // (Tq * Tk), Tq, Tk, query_offset,
                                                scale)
    return dprobs


def attention_fits(head_size: int) -> bool:
    """The attention kernels take head sizes that are whole vectors of 8, up to 256."""
    return head_size % 8 == 0 and head_size <= 256


_packed_rows = {}


def causal_rows(T: int) -> np.ndarray:
    """Start of each row of a packed causal (T, T) triangle, T + 1 entries: row i holds keys
    [0, i] rounded up to a multiple of 8 (at most T), so rows are whole vectors."""
    rows = _packed_rows.get(T)
    if rows is None:
        spans = np.minimum((np.arange(1, T + 1) + 7) // 8 * 8, T)
        rows = _packed_rows[T] = np.concatenate([[0], np.cumsum(spans)]).astype(np.int64)
    return rows


def unpack_causal(packed, T: int):
    """(..., P) packed triangles -> (..., T, T), zeros above the diagonal (for the NumPy path)."""
    rows = causal_rows(T)
    spans = np.diff(rows)
    row_of = np.repeat(np.arange(T), spans)
    column = np.arange(rows[-1]) - rows[:-1][row_of]
    full = np.zeros((*packed.shape[:-1], T, T), packed.dtype)
    full[..., row_of, column] = packed
    return full


def attention_forward(qkv, n_head, scale):
    """qkv (B, T, 3C) -> y (B, T, C), probs (B, H, P) as packed triangles (see causal_rows)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    rows = causal_rows(T)
    y = np.empty((B, T, C), qkv.dtype)
    probs = np.empty((B, n_head, int(rows[-1])), qkv.dtype)
    work = np.empty(T * (C // n_head), qkv.dtype)
    _fn("attention_forward", qkv.dtype)(_ptr(qkv), _ptr(y), _ptr(probs), _ptr(rows), _ptr(work),
                                        B, T, C, n_head, scale)
    return y, probs


def attention_backward(dy, qkv, probs, scale):
    """dy (B, T, C), probs (B, H, P) packed -> dqkv (B, T, 3C)."""
    B, T, C = dy.shape
    n_head = probs.shape[1]
    rows = causal_rows(T)
    dqkv = np.empty_like(qkv)
    work = np.empty(T * (C // n_head) + int(rows[-1]), dy.dtype)
    _fn("attention_backward", dy.dtype)(_ptr(dy), _ptr(qkv), _ptr(probs), _ptr(rows), _ptr(dqkv),
                                        _ptr(work), B, T, C, n_head, scale)
    return dqkv


def cross_entropy_forward(logits2d, targets, ignore_index):
    """In place: logits2d (N, V) becomes probs. Returns nll (N,), 0 at ignored targets."""
    N, V = logits2d.shape
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    nll = np.empty(N, logits2d.dtype)
    bad = _fn("cross_entropy_forward", logits2d.dtype)(_ptr(logits2d), _ptr(targets), _ptr(nll),
                                                       N, V, ignore_index)
    if bad >= 0:
        raise IndexError(f"target {int(targets[bad])} at position {bad} is outside the "
                         f"vocabulary of {V}")
    return nll


def adamw_update(param, grad, m, v, lr, weight_decay, beta1, beta2, step_size, eps_scaled):
    """weight_decay: a float, or an array of per-element rates like param (C-contiguous)."""
    rates = None if isinstance(weight_decay, (int, float)) else weight_decay
    _fn("adamw_update", param.dtype)(_ptr(param), _ptr(grad), _ptr(m), _ptr(v),
                                     None if rates is None else _ptr(rates), param.size, lr,
                                     0.0 if rates is not None else weight_decay, beta1, beta2,
                                     step_size, eps_scaled)

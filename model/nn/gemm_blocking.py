"""float32 matrix products on NumPy, with the inner dimension cut into blocks where this machine's BLAS
needs it.

OpenBLAS (0.3.31 as NumPy bundles it, Haswell kernels, on this project's 2-core AMD EPYC) multiplies
float32 matrices with a small output and an inner dimension K above ~128 at a third of its own speed:
(128 × 256) @ (256 × 128) ran at 9.3 GFLOP/s, against 31 GFLOP/s at K = 384, at M = N ≥ 384, in
float64, and in MKL (PyTorch's BLAS) at every K. These are exactly a small model's shapes: every
weight gradient x.T @ dout has K = tokens per micro-batch. Summing the products of K-blocks of at
most BLOCK_K gives the speed back (3.4× for the weight gradients of the README's main command).

Whether this BLAS is affected is measured once per process (`splitting`), on one such shape, so
another BLAS (MKL, a fixed OpenBLAS) pays nothing. RINGPIPE_GEMM_SPLIT_K=1 / 0 forces it on / off.
The blocked sum adds the same products in another order: results differ from a single product
only by float32 rounding (tests/test_gemm_blocking.py).
"""
from __future__ import annotations

import os
import time

import numpy as np

BLOCK_K = 128
# Outputs up to this many elements took the slow path (M = N = 256 did, 384 did not).
SMALL_OUTPUT = 256 * 256
PROBE = (128, 256, 128)  # M, K, N of the shape timed once per process

_splitting = None


def blocked(a, b, block=BLOCK_K):
    """a (M, K) @ b (K, N) as the sum over ceil(K / block) equal K-blocks of their products."""
    k = a.shape[1]
    parts = -(-k // block)
    step = -(-k // parts)
    out = a[:, :step] @ b[:step]
    for start in range(step, k, step):
        out += a[:, start:start + step] @ b[start:start + step]
    return out


def _probe() -> bool:
    """True when blocking the probe shape takes under 0.7× the plain product's time (best of 5)."""
    m, k, n = PROBE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    plain = split = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        plain = min(plain, time.perf_counter() - start)
        start = time.perf_counter()
        blocked(a, b)
        split = min(split, time.perf_counter() - start)
    return split < 0.7 * plain


def splitting() -> bool:
    """Whether float32 products of small outputs are blocked in this process (measured once)."""
    global _splitting
    if _splitting is None:
        forced = os.environ.get("RINGPIPE_GEMM_SPLIT_K")
        _splitting = forced == "1" if forced in ("0", "1") else _probe()
    return _splitting


def matmul32(a, b):
    """a (M, K) @ b (K, N) for float32 NumPy arrays; other ranks, shapes and operand types (an int8
    weight that multiplies itself, `__rmatmul__`) are a plain `a @ b`."""
    if (type(b) is np.ndarray and a.ndim == 2 and b.ndim == 2 and a.shape[1] > BLOCK_K and a.shape[0] * b.shape[1] <= SMALL_OUTPUT
            and splitting()):
        return blocked(a, b)
    return a @ b

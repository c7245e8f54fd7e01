"""int8 weights with absmax scales: quantize, dequantize, and the product a linear layer takes.

A linear weight W (in, out) — the (in, out) layout of GPT-2's Conv1D, y = x @ W — becomes

    values  int8 (in, out)   round(W / scale), clipped to [-127, 127]
    scale   float (out,)     per output channel (column): max_i |W[i, j]| / 127, so each column
                             uses the whole int8 range; or (1,) for one per-tensor scale
    outlier_rows int64 (k,), outlier_values float (k, out)
                             input features kept in float, as LLM.int8() keeps its outlier
                             features: those rows are zero in `values` and excluded from the scale

Every element's error is at most half its column's scale (`dequantize` - W). The product is
weight-only int8 (torchao's int8_weight_only, bitsandbytes' W8A16): `x @ weight` with an
`Int8Weight` computes (x @ values) * scale + x[:, outlier_rows] @ outlier_values, in x's float
dtype; NumPy has no int8 BLAS, so the int8 block is widened for the product and the scales applied
to the (N, out) result rather than to the weight.
"""
from __future__ import annotations

import numpy as np

QMAX = 127  # symmetric: -128 is never used, so negating a weight never overflows
GRANULARITIES = ("channel", "tensor")


def absmax_scale(weight, granularity: str = "channel"):
    """weight (in, out) -> float scale (out,) per output channel, or (1,) for the whole tensor.

    An all-zero column gets scale 1 (its values are 0 whatever the scale) rather than 0."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown int8 scale granularity {granularity!r}; expected one of {GRANULARITIES}")
    absmax = np.abs(weight).max(axis=0) if granularity == "channel" else np.abs(weight).max(keepdims=True)
    absmax = np.asarray(absmax, dtype=np.float32).reshape(-1)
    return np.where(absmax > 0, absmax / QMAX, 1).astype(np.float32)


class Int8Weight:
    """A linear weight (in, out) held as int8 values and float scales (see the module docstring).

    Accepted wherever a linear layer takes its weight: `x @ w` (NumPy defers to `__rmatmul__`
    because `__array_ufunc__` is None), `w.shape`, `w.dtype` (the float dtype of the product).
    Inference only: there is no transpose, so a backward through it fails loudly.
    """

    __array_ufunc__ = None  # ndarray @ Int8Weight -> Int8Weight.__rmatmul__

    def __init__(self, values, scale, outlier_rows=None, outlier_values=None, dtype=np.float32):
        self.values, self.dtype = values, np.dtype(dtype)
        self.scale = scale.astype(self.dtype)
        self.outlier_rows = (np.zeros(0, np.int64) if outlier_rows is None else outlier_rows).astype(np.int64)
        self.outlier_values = (np.zeros((0, values.shape[1]), self.dtype) if outlier_values is None
                               else outlier_values.astype(self.dtype))

    @property
    def shape(self) -> tuple:
        return tuple(self.values.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: int8 values, scales, outlier rows and their indices."""
        return int(self.values.nbytes + self.scale.nbytes + self.outlier_rows.nbytes
                   + self.outlier_values.nbytes)

    def to(self, xp, dtype) -> "Int8Weight":
        """This weight with its arrays in array module `xp` (NumPy or CuPy), the product in `dtype`."""
        return Int8Weight(xp.asarray(self.values), xp.asarray(self.scale), xp.asarray(self.outlier_rows),
                          xp.asarray(self.outlier_values), dtype)

    def __rmatmul__(self, x):
        """x (N, in) float -> x @ W (N, out) in x's dtype."""
        out = x @ self.values.astype(x.dtype)
        out *= self.scale.astype(x.dtype, copy=False)
        if len(self.outlier_rows):
            out += x[:, self.outlier_rows] @ self.outlier_values.astype(x.dtype, copy=False)
        return out

    def dequantize(self):
        """The float weight (in, out) this stands for: values * scale, outlier rows in float."""
        weight = self.values.astype(self.dtype) * self.scale
        weight[self.outlier_rows] = self.outlier_values
        return weight

    def select(self, axis: int, indices):
        """The Int8Weight of rows (axis 0: input features) or columns (axis 1: output channels)
        `indices` — a tensor-parallel rank's shard of a row- or column-parallel weight."""
        indices = np.asarray(indices)
        if axis == 1:
            scale = self.scale[indices] if len(self.scale) > 1 else self.scale
            return Int8Weight(self.values[:, indices], scale, self.outlier_rows,
                              self.outlier_values[:, indices], self.dtype)
        if axis != 0:
            raise ValueError(f"Int8Weight.select: axis {axis}; a linear weight has axes 0 (in) and 1 (out)")
        local = {int(row): k for k, row in enumerate(indices)}
        kept = [k for k, row in enumerate(self.outlier_rows) if int(row) in local]
        return Int8Weight(self.values[indices], self.scale,
                          np.array([local[int(self.outlier_rows[k])] for k in kept], np.int64),
                          self.outlier_values[kept], self.dtype)

    def __repr__(self):
        return (f"Int8Weight(shape={self.shape}, scales={len(self.scale)}, "
                f"outlier_rows={len(self.outlier_rows)}, dtype={self.dtype})")


def quantize_int8(weight, granularity: str = "channel", outlier_rows=None, dtype=None) -> Int8Weight:
    """weight float (in, out) -> Int8Weight with absmax scales per output channel ("channel") or
    one for the tensor ("tensor"); `outlier_rows` (input features) stay in float and do not count
    toward the scales. The product runs in `dtype` (default: the weight's float dtype)."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"quantize_int8: a linear weight is 2-D (in, out), got shape {weight.shape}")
    dtype = np.dtype(dtype or (weight.dtype if weight.dtype.kind == "f" else np.float32))
    rows = np.unique(np.asarray([] if outlier_rows is None else outlier_rows, np.int64))
    if len(rows) and (rows[0] < 0 or rows[-1] >= weight.shape[0]):
        raise ValueError(f"quantize_int8: outlier rows must lie in [0, {weight.shape[0]}), got {rows.tolist()[:5]}")
    inliers = weight.astype(np.float32)
    inliers[rows] = 0
    scale = absmax_scale(inliers, granularity)
    values = np.clip(np.rint(inliers / scale), -QMAX, QMAX).astype(np.int8)
    return Int8Weight(values, scale, rows, weight[rows], dtype)

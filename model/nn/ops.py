"""GPT-2 ops as forward/backward pairs, side by side (llm.c style).

Each `*_forward` returns `(out, cache)`: the cache names exactly the activations its `*_backward`
needs, so the memory held between forward and backward is visible at the call site. One code path
serves NumPy and CuPy: the array module is always taken from the inputs (`module_of`).

Shapes: B batch, T time, C channels, H heads, V vocabulary. Linear weights use GPT-2's Conv1D
layout (in × out, y = x @ W + b).

float16 (mixed precision, see model/nn/mixed_precision.py): activations, weights and gradients are
float16, but what loses too much in 11 bits runs in float32, as Megatron-LM and apex do: LayerNorm
statistics, attention scores and softmax, the cross-entropy (its probabilities and dlogits stay
float32; callers round dlogits to float16), the embedding's gradient sums, and every matmul's
accumulation. GELU, dropout and residuals run in float16.
"""
from __future__ import annotations

import math

import numpy as np

from ringpipe.model.nn import gemm_blocking, kernels
from ringpipe.runtime.array_module import module_of

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
LAYERNORM_EPS = 1e-5


# Dtypes computed as described in the module docstring (float32 statistics and accumulation).
LOW_PRECISION = (np.dtype(np.float16),)


def is_low_precision(x) -> bool:
    return x.dtype in LOW_PRECISION


def matmul(a, b):
    """a @ b, accumulated in float32 for float16 inputs (the result rounded once to float16).

    GPU tensor cores accumulate float16 products in float32; NumPy's own float16 loop does too but
    has no BLAS (~20x slower), so on NumPy the operands are widened. CuPy arrays go to cuBLAS as
    they are. NumPy float32 products go through `gemm_blocking.matmul32` (it works around a slow
    OpenBLAS path for small outputs with a long inner dimension).
    """
    if type(a) is np.ndarray:
        if a.dtype in LOW_PRECISION:
            return gemm_blocking.matmul32(a.astype(np.float32), b.astype(np.float32)).astype(a.dtype)
        if a.dtype == np.float32:
            return gemm_blocking.matmul32(a, b)
    return a @ b


_ones_cache = {}


def _ones(xp, n, dtype):
    """A cached read-only (n, 1) column of ones."""
    key = (xp.__name__, n, dtype)
    ones = _ones_cache.get(key)
    if ones is None:
        ones = _ones_cache[key] = xp.ones((n, 1), dtype=dtype)
    return ones


def _row_sums(x2d):
    """Sums over the last axis, (N, D) -> (N, 1); a gemv is several times faster than x.sum(-1)."""
    return matmul(x2d, _ones(module_of(x2d), x2d.shape[-1], x2d.dtype))


def _column_sums(x2d):
    """Sums over the first axis, (N, D) -> (D,)."""
    return matmul(_ones(module_of(x2d), x2d.shape[0], x2d.dtype).T, x2d)[0]


# ----------------------------------------------------------------------------- embedding

def embedding_forward(weight, idx):
    """weight (V, C), idx int (B, T) -> out (B, T, C); cache: idx."""
    return weight[idx], idx


def embedding_backward(dout, idx, num_embeddings):
    """dout (B, T, C) -> dweight (num_embeddings, C): the rows of dout summed per index."""
    if is_low_precision(dout):  # sums of many rows: in float32, rounded once
        return embedding_backward(dout.astype(np.float32), idx, num_embeddings).astype(dout.dtype)
    xp = module_of(dout)
    C = dout.shape[-1]
    flat_idx, rows = idx.reshape(-1), dout.reshape(-1, C)
    dweight = xp.zeros((num_embeddings, C), dtype=dout.dtype)
    if not hasattr(xp.add, "reduceat"):  # array modules without reduceat scatter-add instead
        xp.add.at(dweight, flat_idx, rows)
        return dweight
    # Sorting groups equal indices, so each group is one contiguous reduceat segment: several
    # times faster than add.at's element-by-element scatter.
    order = xp.argsort(flat_idx, kind="stable")
    sorted_idx = flat_idx[order]
    starts = xp.flatnonzero(xp.concatenate([xp.ones(1, bool), sorted_idx[1:] != sorted_idx[:-1]]))
    dweight[sorted_idx[starts]] = xp.add.reduceat(rows[order], starts, axis=0)
    return dweight


# ----------------------------------------------------------------------------- layernorm

def layernorm_forward(x, weight, bias, eps=LAYERNORM_EPS):
    """x (..., C) -> out (..., C); cache: (xhat (N, C) normalized input, rstd (N, 1)).

    float16 x: computed in float32 (the cache stays float32), out rounded to float16."""
    if is_low_precision(x):
        out, cache = layernorm_forward(x.astype(np.float32), weight.astype(np.float32),
                                       bias.astype(np.float32), eps)
        return out.astype(x.dtype), cache
    xp = module_of(x)
    C = x.shape[-1]
    x2d = x.reshape(-1, C)
    if kernels.usable(x2d, weight, bias):
        out, xhat, rstd = kernels.layernorm_forward(x2d, weight, bias, eps)
        return out.reshape(x.shape), (xhat, rstd)
    xhat = x2d - _row_sums(x2d) * (1.0 / C)
    var = _row_sums(xhat * xhat)
    var *= 1.0 / C
    var += eps
    rstd = xp.sqrt(var, out=var)
    xp.divide(1.0, rstd, out=rstd)
    xhat *= rstd
    out = xhat * weight
    out += bias
    return out.reshape(x.shape), (xhat, rstd)


def layernorm_backward(dout, cache, weight):
    """dout (..., C) -> dx (..., C), dweight (C,), dbias (C,); float16 dout: computed in float32,
    the three results rounded to float16."""
    if is_low_precision(dout):
        grads = layernorm_backward(dout.astype(np.float32), cache, weight.astype(np.float32))
        return tuple(g.astype(dout.dtype) for g in grads)
    xhat, rstd = cache
    C = dout.shape[-1]
    dout2d = dout.reshape(-1, C)
    if kernels.usable(dout2d, xhat, rstd, weight):
        dx, dweight, dbias = kernels.layernorm_backward(dout2d, xhat, rstd, weight)
        return dx.reshape(dout.shape), dweight, dbias
    dbias = _column_sums(dout2d)
    dout_xhat = dout2d * xhat
    dweight = _column_sums(dout_xhat)
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), with dxhat = dout * weight;
    # both row means are gemvs against weight, so dxhat is formed once, for the final sum.
    weight_column = weight.reshape(-1, 1) * (1.0 / C)
    mean_dxhat_xhat = dout_xhat @ weight_column
    mean_dxhat = dout2d @ weight_column
    dx = xhat * mean_dxhat_xhat
    dx += mean_dxhat
    module_of(dout).subtract(dout2d * weight, dx, out=dx)
    dx *= rstd
    return dx.reshape(dout.shape), dweight, dbias


# ----------------------------------------------------------------------------- linear (Conv1D)

def linear_forward(x, weight, bias=None):
    """x (..., in), weight (in, out), bias (out,) or None -> out (..., out); cache: x."""
    out = matmul(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[1]), x


def linear_backward_input(dout, weight):
    """dout (..., out), weight (in, out) -> dx (..., in). Needs no activation."""
    dx = matmul(dout.reshape(-1, dout.shape[-1]), weight.T)
    return dx.reshape(*dout.shape[:-1], weight.shape[0])


def linear_backward_weight(dout, x, has_bias=True):
    """dout (..., out), cache x (..., in) -> dweight (in, out), dbias (out,) or None.

    Separate from the input gradient so that pipeline schedules can run it later.
    """
    dout2d = dout.reshape(-1, dout.shape[-1])
    dweight = matmul(x.reshape(-1, x.shape[-1]).T, dout2d)
    return dweight, (_column_sums(dout2d) if has_bias else None)


# ----------------------------------------------------------------------------- GELU ("gelu_new")

def gelu_forward(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as x * sigmoid(2 z).

    x (...) -> out (...); cache: (x, sigmoid(2 z)). exp is twice as fast as tanh here and the
    cached sigmoid makes the backward free of transcendentals.
    """
    if kernels.usable(x):
        out, sig = kernels.gelu_forward(x, GELU_SCALE, GELU_CUBIC)
        return out, (x, sig)
    xp = module_of(x)
    u = x * x
    u *= -2.0 * GELU_SCALE * GELU_CUBIC
    u -= 2.0 * GELU_SCALE
    u *= x  # u = -2 z
    # For x below about -10, exp(u) overflows float32 to inf, and 1 / (1 + inf) is the right 0;
    # silencing the warning costs far less than clipping u first (np.minimum: ~2 passes).
    with np.errstate(over="ignore"):
        xp.exp(u, out=u)
    u += 1.0
    sig = xp.divide(1.0, u, out=u)
    return x * sig, (x, sig)


def gelu_backward(dout, cache):
    """dout (...) -> dx = dout * (s + 2 x s (1 - s) dz/dx), s = sigmoid(2 z)."""
    x, sig = cache
    if kernels.usable(dout, x, sig):
        return kernels.gelu_backward(dout, x, sig, GELU_SCALE, GELU_CUBIC)
    # grad = s + x * dz/dx * 2 s (1 - s),  dz/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    g = x * x
    g *= 3.0 * GELU_CUBIC * 2.0 * GELU_SCALE
    g += 2.0 * GELU_SCALE
    g *= x
    one_minus = 1.0 - sig
    one_minus *= sig
    g *= one_minus
    g += sig
    g *= dout
    return g


# ----------------------------------------------------------------------------- residual, dropout

def residual_forward(x, y):
    """x + y; no cache."""
    return x + y


def residual_backward(dout):
    """The gradient flows unchanged into both branches."""
    return dout, dout


def dropout_forward(x, p, rng):
    """Zeroes each element with probability p and scales survivors by 1/(1-p).

    x (...) -> out (...); cache: keep_mask (0 or 1/(1-p) per element), or None when p is 0.
    """
    if p == 0.0:
        return x, None
    # Generators draw float32 or float64 only; float16 masks come from the float32 draw (the same
    # mask a float32 run draws).
    draw = np.float32 if is_low_precision(x) else x.dtype
    keep_mask = (rng.random(x.shape, dtype=draw) >= p).astype(x.dtype)
    keep_mask *= 1.0 / (1.0 - p)
    return x * keep_mask, keep_mask


def dropout_backward(dout, keep_mask):
    """dout * keep_mask (which already holds the 1/(1-p) scale)."""
    if keep_mask is None:
        return dout
    return dout * keep_mask


# ----------------------------------------------------------------------------- cross-entropy

def cross_entropy_forward(logits, targets, ignore_index=-1, overwrite_logits=False):
    """Mean softmax cross-entropy over targets != ignore_index.

    logits (B, T, V), targets int (B, T) -> loss (python float); cache: (probs (B, T, V),
    targets with ignored ones set to 0, valid mask, count). With overwrite_logits the softmax is
    computed in place (saves a (B, T, V) buffer). float16 logits: computed on a float32 copy, so
    probs (and the backward's dlogits) are float32.
    """
    if is_low_precision(logits):
        logits, overwrite_logits = logits.astype(np.float32), True
    xp = module_of(logits)
    V = logits.shape[-1]
    probs = logits if overwrite_logits else logits.copy()
    flat = probs.reshape(-1, V)
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    count = int(valid.sum())
    safe_targets = xp.where(valid, flat_targets, 0)
    if kernels.usable(flat):
        nll = kernels.cross_entropy_forward(flat, flat_targets, ignore_index)
        return float(nll.sum()) / max(count, 1), (probs, safe_targets, valid, count)
    outside = (safe_targets < 0) | (safe_targets >= V)
    if bool(outside.any()):  # fancy indexing would wrap negative targets around silently
        bad = int(xp.flatnonzero(outside)[0])
        raise IndexError(f"target {int(flat_targets[bad])} at position {bad} is outside the "
                         f"vocabulary of {V}")
    flat -= flat.max(-1, keepdims=True)
    target_logit = flat[xp.arange(flat.shape[0]), safe_targets]  # shifted, gathered before exp
    xp.exp(flat, out=flat)
    sums = _row_sums(flat)
    flat /= sums
    # -log p[target] = log(sum exp) - shifted logit: exact even where p underflows
    nll = xp.log(sums[:, 0]) - target_logit
    loss = float((nll * valid).sum()) / max(count, 1)
    return loss, (probs, safe_targets, valid, count)


def cross_entropy_backward(cache, dloss=1.0):
    """-> dlogits (B, T, V) = (probs - onehot(targets)) * valid * dloss / count.

    Consumes the cache: dlogits is written over probs (float32 when the logits were float16).
    """
    probs, safe_targets, valid, count = cache
    xp = module_of(probs)
    flat = probs.reshape(-1, probs.shape[-1])
    flat[xp.arange(flat.shape[0]), safe_targets] -= 1.0
    flat *= (valid * (dloss / max(count, 1))).astype(probs.dtype)[:, None]
    return probs

"""Causal multi-head self-attention (GPT-2's) and the softmax it is built on, as forward/backward
pairs in the style of model/nn/ops.py (whose conventions and float16 rules hold here: scores,
softmax and the weighted sum run in float32 for float16 inputs).

Shapes: B batch, T time, C channels, H heads.
"""
from __future__ import annotations

import math

import numpy as np

from ringpipe.model.nn import kernels
from ringpipe.model.nn.ops import _row_sums, dropout_backward, dropout_forward, is_low_precision
from ringpipe.runtime.array_module import module_of


# ----------------------------------------------------------------------------- causal attention

_causal_bias_cache = {}


def _causal_bias(xp, T, dtype):
    """(T, T) additive mask: 0 where key <= query, -inf above the diagonal."""
    key = (xp.__name__, T, str(dtype))
    if key not in _causal_bias_cache:
        bias = xp.triu(xp.full((T, T), -xp.inf, dtype=dtype), k=1)
        _causal_bias_cache[key] = bias
    return _causal_bias_cache[key]


def split_heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v views, each (B, H, T, hs)."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)


def _query_blocks(T):
    """[(start, end), ...] splitting T queries into up to 4 blocks of at least 64.

    Queries in [start, end) attend to keys [0, end) only, so blocks skip the masked upper
    triangle: 4 blocks do 5/8 of the full (T, T) matmul and softmax work. Shorter blocks cost
    more in per-call overhead than they save (measured at T=64).
    """
    n = max(1, min(4, T // 64))
    bounds = [round(T * j / n) for j in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def attention_forward(qkv, n_head, dropout_p=0.0, rng=None, scale=None):
    """Causal multi-head self-attention. qkv (B, T, 3C) -> y (B, T, C).

    Scores q.k are multiplied by `scale` (None: 1/sqrt(head size), GPT-2's default).
    cache: (qkv, query blocks [(start, end), ...] (see _query_blocks), per block the softmax
    output (B, H, end - start, end), per block its dropout keep-mask (None without dropout)).
    Without dropout the C kernel does all of it as one block, its softmax output kept as packed
    lower triangles (B, H, P), about half the memory (see kernels.causal_rows).
    float16 qkv: scores, softmax and the weighted sum in float32 (cache too), y rounded to float16.
    """
    if is_low_precision(qkv):
        y, cache = attention_forward(qkv.astype(np.float32), n_head, dropout_p, rng, scale)
        return y.astype(qkv.dtype), cache
    xp = module_of(qkv)
    B, T, C3 = qkv.shape
    if scale is None:
        scale = 1.0 / math.sqrt(C3 // (3 * n_head))
    if dropout_p == 0.0 and kernels.attention_fits(C3 // (3 * n_head)) and kernels.usable(qkv):
        y, probs = kernels.attention_forward(qkv, n_head, scale)
        return y, (qkv, [(0, T)], [probs], [None])
    q, k, v = split_heads(qkv, n_head)
    bias = _causal_bias(xp, T, qkv.dtype)
    y = xp.empty((B, T, n_head, q.shape[-1]), dtype=qkv.dtype)
    y_heads = y.transpose(0, 2, 1, 3)  # (B, H, T, hs) view of y
    blocks, probs, keep_masks = _query_blocks(T), [], []
    fused = kernels.usable(qkv)
    for start, end in blocks:
        scores = q[:, :, start:end] @ k[:, :, :end].swapaxes(-1, -2)
        if fused:  # scale, mask and softmax in one pass, in place
            block_probs = kernels.causal_softmax_forward(scores, start, scale)
        else:
            scores *= scale
            scores += bias[start:end, :end]
            block_probs = softmax_forward(scores)
        attn, keep_mask = dropout_forward(block_probs, dropout_p, rng)
        xp.matmul(attn, v[:, :, :end], out=y_heads[:, :, start:end])
        probs.append(block_probs)
        keep_masks.append(keep_mask)
    return y.reshape(B, T, C3 // 3), (qkv, blocks, probs, keep_masks)


def attention_backward(dy, cache, n_head, scale=None):
    """dy (B, T, C) -> dqkv (B, T, 3C); `scale` as given to attention_forward.
    float16 dy: in float32 (as the forward), dqkv float16."""
    if is_low_precision(dy):
        return attention_backward(dy.astype(np.float32), cache, n_head, scale).astype(dy.dtype)
    xp = module_of(dy)
    qkv, blocks, probs, keep_masks = cache
    B, T, C = dy.shape
    if scale is None:
        scale = 1.0 / math.sqrt(C // n_head)
    if probs[0].ndim == 3:  # packed by the C forward
        if kernels.usable(dy, qkv, probs[0]):
            return kernels.attention_backward(dy, qkv, probs[0], scale)
        probs = [kernels.unpack_causal(probs[0], T)]  # kernels turned off since the forward
    q, k, v = split_heads(qkv, n_head)
    dy = dy.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
    dqkv = xp.empty((B, T, 3, n_head, C // n_head), dtype=dy.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)
    # The last block sees every key: it writes dk and dv, the earlier blocks add to them.
    for n, ((start, end), block_probs, keep_mask) in enumerate(
            reversed(list(zip(blocks, probs, keep_masks)))):
        dy_block = dy[:, :, start:end]
        attn = block_probs if keep_mask is None else block_probs * keep_mask
        dattn = dropout_backward(dy_block @ v[:, :, :end].swapaxes(-1, -2), keep_mask)
        if kernels.usable(dattn, block_probs):
            dscores = kernels.causal_softmax_backward(dattn, block_probs, start, scale)
        else:
            dscores = softmax_backward(dattn, block_probs)
            dscores *= scale
        xp.matmul(dscores, k[:, :, :end], out=dq[:, :, start:end])
        if n == 0:  # matmuls straight into dqkv: no block-sized temporaries to copy
            xp.matmul(attn.swapaxes(-1, -2), dy_block, out=dv)
            xp.matmul(dscores.swapaxes(-1, -2), q[:, :, start:end], out=dk)
        else:
            dv[:, :, :end] += attn.swapaxes(-1, -2) @ dy_block
            dk[:, :, :end] += dscores.swapaxes(-1, -2) @ q[:, :, start:end]
    return dqkv.reshape(B, T, 3 * C)


# ----------------------------------------------------------------------------- softmax

# A row whose exp-sum is below this lies more than ~46 below the shared shift: its largest terms
# near float32's underflow would lose precision, so softmax_forward shifts row by row instead.
_SOFTMAX_MIN_SUM = 1e-20

def softmax_forward(x):
    """Softmax over the last axis. Shifts x in place; returns probs (the cache), a new array.

    Softmax is unchanged by a shift per row. One shift for the whole array (a contiguous max,
    ~10x faster than the max of each row of 64) keeps exp from overflowing; only a row lying far
    below the overall top could underflow, and its sum shows it: then every row takes its own max.
    """
    xp = module_of(x)
    rows = x.reshape(-1, x.shape[-1])
    rows -= rows.max()
    probs = xp.exp(rows)
    sums = _row_sums(probs)
    if sums.min() < _SOFTMAX_MIN_SUM:
        rows -= rows.max(-1, keepdims=True)
        xp.exp(rows, out=probs)
        sums = _row_sums(probs)
    probs *= xp.divide(1.0, sums, out=sums)  # a multiply is faster than a broadcast divide
    return probs.reshape(x.shape)


def softmax_backward(dprobs, probs):
    """dprobs, probs (..., N) -> dx = probs * (dprobs - sum(dprobs * probs)); overwrites dprobs."""
    N = probs.shape[-1]
    dot = _row_sums((dprobs * probs).reshape(-1, N)).reshape(*probs.shape[:-1], 1)
    dprobs -= dot
    dprobs *= probs
    return dprobs

"""Tensor-parallel layers that are not a block's column/row linears: the vocab-parallel embedding
and cross-entropy (Megatron-LM's names), and dropout masks drawn for the full tensor and sliced.

A model family's stage pieces (see model/parallel/plan.py) call these with the tensor-parallel
communicator; the column- and row-parallel linears are plain linears between the regions of
tensor_parallel_communications.py.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.nn import ops
from ringpipe.runtime.array_module import module_of


# ---- vocab-parallel op pairs ----------------------------------------------------------------------------
def vocab_parallel_embedding_forward(weight, idx, vocab_start):
    """weight (V/tp, C) rows [vocab_start, +V/tp), idx int (B, T) -> partial (B, T, C): the rows of
    ids this rank holds, zeros elsewhere (summing over tp gives the lookup); cache (local ids, mask)."""
    xp = module_of(weight)
    local = idx - vocab_start
    mine = (local >= 0) & (local < weight.shape[0])
    local = xp.where(mine, local, 0)
    out = weight[local]
    out *= mine[..., None]
    return out, (local, mine)


def vocab_parallel_embedding_backward(dout, cache, rows):
    """dout (B, T, C) (the whole gradient) -> dweight (rows, C) of this rank's slice."""
    local, mine = cache
    return ops.embedding_backward(dout * mine[..., None], local, rows)


def vocab_parallel_cross_entropy_forward(logits, targets, vocab_start, vocab_size, comm, ignore_index=-1):
    """Mean cross-entropy from sharded logits, without gathering them.

    logits (B, T, V/tp): columns [vocab_start, +V/tp) of the full logits (overwritten with the softmax;
    float16 logits: a float32 copy is, and the cache's probs are float32);
    columns ≥ vocab_size are padding and get probability 0. targets int (B, T), full ids.
    Two all-reduces over `comm`: the row max, then (sum of exponentials, target logit) together.
    -> (loss float, cache (probs, local targets, mask of targets on this rank, valid mask, count)).
    """
    if ops.is_low_precision(logits):  # statistics and probs in float32, as ops.cross_entropy_forward
        logits = logits.astype(np.float32)
    xp = module_of(logits)
    rows = logits.shape[-1]
    flat = logits.reshape(-1, rows)
    if vocab_start + rows > vocab_size:
        flat[:, max(vocab_size - vocab_start, 0):] = -xp.inf
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    count = int(valid.sum())
    local = flat_targets - vocab_start
    mine = valid & (local >= 0) & (local < rows)
    local = xp.where(mine, local, 0)
    row_max = xp.ascontiguousarray(flat.max(-1))
    comm.all_reduce(row_max, op="max")
    flat -= row_max[:, None]
    stats = xp.empty((flat.shape[0], 2), dtype=flat.dtype)  # sum of exp, shifted target logit
    stats[:, 1] = xp.where(mine, flat[xp.arange(flat.shape[0]), local], 0.0)
    xp.exp(flat, out=flat)
    stats[:, 0] = flat.sum(-1)
    comm.all_reduce(stats)
    flat /= stats[:, :1]
    nll = xp.log(stats[:, 0]) - stats[:, 1]
    loss = float((nll * valid).sum()) / max(count, 1)
    return loss, (logits, local, mine, valid, count)


def vocab_parallel_cross_entropy_backward(cache, dloss=1.0):
    """-> dlogits (B, T, V/tp) = (probs - onehot) · valid · dloss / count, over the cached probs."""
    probs, local, mine, valid, count = cache
    xp = module_of(probs)
    flat = probs.reshape(-1, probs.shape[-1])
    flat[xp.arange(flat.shape[0]), local] -= mine.astype(probs.dtype)
    flat *= (valid * (dloss / max(count, 1))).astype(probs.dtype)[:, None]
    return probs


class SliceOfFullDraw:
    """A generator that hands out a slice of the draw the dense model makes for the full tensor,
    so that dropout masks of shards are exactly the dense masks' slices."""

    def __init__(self, rng, full_shape, index):
        self.rng, self.full_shape, self.index = rng, full_shape, index

    def random(self, shape, dtype):
        return self.rng.random(self.full_shape, dtype=dtype)[self.index]

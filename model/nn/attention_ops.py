"""Attention for encoders and encoder-decoders, as forward/backward pairs (llm.c style).

Beside GPT-2's causal self-attention (model/nn/causal_attention.py) these are the attentions BERT and T5 need:
- self-attention over every position (optionally causal: T5's decoder), keys hidden by a padding
  mask, scores optionally shifted by a position bias (T5);
- cross-attention: queries from the decoder, keys and values projected from the encoder output;
  its backward returns the encoder output's gradient, which the caller sums over every decoder
  layer that reads the same encoder output;
- T5's bucketed relative position bias: the bucket of each (query, key) distance and the lookup of
  a (num_buckets, H) table.

Each `*_forward` returns `(out, cache)`, the cache naming what the backward needs. The array module
comes from the inputs (NumPy or CuPy). float16 inputs are computed in float32 (scores, softmax and
the weighted sum, as causal_attention.attention_forward does) and rounded once.

Shapes: B batch, Tq query positions, Tk key positions, C channels, H heads, hs = C / H.
"""
from __future__ import annotations

import math

import numpy as np

from ringpipe.model.nn.causal_attention import _causal_bias, softmax_backward, softmax_forward, split_heads
from ringpipe.model.nn.ops import (dropout_backward, dropout_forward, embedding_backward, is_low_precision,
                                   linear_backward_input, linear_backward_weight, linear_forward)
from ringpipe.runtime.array_module import module_of

# T5's defaults (relative_attention_num_buckets, relative_attention_max_distance).
NUM_BUCKETS = 32
MAX_DISTANCE = 128


# ----------------------------------------------------------------------------- masks

def padding_bias(key_mask, dtype):
    """key_mask (B, Tk), nonzero where the key is a real token -> additive bias (B, 1, 1, Tk).

    Padding gets the dtype's most negative finite value rather than -inf, so that a query whose
    keys are all padding gets a uniform softmax instead of NaN (as transformers does).
    """
    xp = module_of(key_mask)
    bias = xp.where(key_mask.astype(bool), 0.0, float(np.finfo(dtype).min)).astype(dtype)
    return bias[:, None, None, :]


def _score_bias(xp, B, Tq, Tk, dtype, key_mask, position_bias, causal):
    """The sum of every additive bias on the scores, broadcastable to (B, H, Tq, Tk), or None."""
    bias = None
    if key_mask is not None:
        if key_mask.shape != (B, Tk):
            raise ValueError(f"key mask of shape {tuple(key_mask.shape)} does not match "
                             f"(batch, keys) = {(B, Tk)}")
        bias = padding_bias(key_mask, dtype)
    if position_bias is not None:
        position_bias = position_bias.astype(dtype, copy=False)
        bias = position_bias if bias is None else bias + position_bias
    if causal:
        if Tq != Tk:
            raise ValueError(f"causal attention needs as many queries as keys, got {Tq} and {Tk}")
        mask = _causal_bias(xp, Tq, dtype)
        bias = mask if bias is None else bias + mask
    return bias


# ----------------------------------------------------------------------------- the core

def _attend_forward(q, k, v, bias, scale, dropout_p, rng):
    """q (B, H, Tq, hs), k and v (B, H, Tk, hs) -> y (B, H, Tq, hs), probs, dropout keep-mask."""
    scores = q @ k.swapaxes(-1, -2)
    scores *= scale
    if bias is not None:
        scores += bias
    probs = softmax_forward(scores)
    attn, keep_mask = dropout_forward(probs, dropout_p, rng)
    return attn @ v, probs, keep_mask


def _attend_backward(dy, q, k, v, probs, keep_mask, scale):
    """dy (B, H, Tq, hs) -> dq, dk, dv, dscores (B, H, Tq, Tk): the gradient of the biased scores,
    which is also the gradient of any additive bias before its broadcast axes are summed."""
    attn = probs if keep_mask is None else probs * keep_mask
    dv = attn.swapaxes(-1, -2) @ dy
    dscores = softmax_backward(dropout_backward(dy @ v.swapaxes(-1, -2), keep_mask), probs)
    dq = dscores @ k
    dq *= scale
    dk = dscores.swapaxes(-1, -2) @ q
    dk *= scale
    return dq, dk, dv, dscores


def _sum_to_shape(grad, shape):
    """Sums grad (B, H, Tq, Tk) over the axes a bias of `shape` was broadcast along."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _merge_heads(y):
    """(B, H, T, hs) -> (B, T, C)."""
    B, H, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def _heads(x, n_head):
    """(B, T, C) -> (B, H, T, hs) view."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- self-attention

def self_attention_forward(qkv, n_head, key_mask=None, position_bias=None, causal=False,
                           scale=None, dropout_p=0.0, rng=None):
    """Multi-head self-attention over all positions (BERT, T5's encoder; T5's decoder with causal).

    qkv (B, T, 3C) fused as for causal_attention.attention_forward; key_mask (B, T) nonzero for real tokens, or
    None; position_bias broadcastable to (B, H, T, T) added to the scores (T5), or None; scale
    multiplies q.k (None: 1/sqrt(hs); T5 uses 1.0). -> y (B, T, C);
    cache: (qkv, position_bias's shape or None, probs (B, H, T, T), dropout keep-mask or None).
    """
    if is_low_precision(qkv):
        y, cache = self_attention_forward(qkv.astype(np.float32), n_head, key_mask, position_bias,
                                          causal, scale, dropout_p, rng)
        return y.astype(qkv.dtype), cache
    xp = module_of(qkv)
    B, T, C3 = qkv.shape
    scale = 1.0 / math.sqrt(C3 // (3 * n_head)) if scale is None else scale
    q, k, v = split_heads(qkv, n_head)
    bias = _score_bias(xp, B, T, T, qkv.dtype, key_mask, position_bias, causal)
    y, probs, keep_mask = _attend_forward(q, k, v, bias, scale, dropout_p, rng)
    bias_shape = None if position_bias is None else position_bias.shape
    return _merge_heads(y), (qkv, bias_shape, probs, keep_mask)


def self_attention_backward(dy, cache, n_head, scale=None):
    """dy (B, T, C) -> (dqkv (B, T, 3C), dposition_bias in position_bias's shape, or None)."""
    if is_low_precision(dy):
        dqkv, dbias = self_attention_backward(dy.astype(np.float32), cache, n_head, scale)
        return dqkv.astype(dy.dtype), dbias
    qkv, bias_shape, probs, keep_mask = cache
    B, T, C = dy.shape
    scale = 1.0 / math.sqrt(C // n_head) if scale is None else scale
    q, k, v = split_heads(qkv, n_head)
    dq, dk, dv, dscores = _attend_backward(_heads(dy, n_head), q, k, v, probs, keep_mask, scale)
    dqkv = module_of(dy).concatenate([_merge_heads(g) for g in (dq, dk, dv)], axis=-1)
    dbias = None if bias_shape is None else _sum_to_shape(dscores, bias_shape)
    return dqkv, dbias


# ----------------------------------------------------------------------------- cross-attention

def cross_attention_forward(q, encoder_out, kv_weight, kv_bias, n_head, key_mask=None,
                            position_bias=None, scale=None, dropout_p=0.0, rng=None):
    """Decoder queries attend to the encoder output.

    q (B, Tq, C) the decoder's projected queries; encoder_out (B, Tk, Ce); kv_weight (Ce, 2C)
    projecting it to keys then values (Conv1D layout, heads in order inside each half); kv_bias
    (2C,) or None (T5); key_mask (B, Tk) the encoder's padding mask or None; position_bias and
    scale as for self_attention_forward. -> y (B, Tq, C);
    cache: (q, encoder_out, kv (B, Tk, 2C), position_bias's shape or None, probs, keep-mask).
    """
    if is_low_precision(q):
        y, cache = cross_attention_forward(
            q.astype(np.float32), encoder_out.astype(np.float32), kv_weight.astype(np.float32),
            None if kv_bias is None else kv_bias.astype(np.float32), n_head, key_mask,
            position_bias, scale, dropout_p, rng)
        return y.astype(q.dtype), cache
    xp = module_of(q)
    B, Tq, C = q.shape
    Tk = encoder_out.shape[1]
    if encoder_out.shape[0] != B or kv_weight.shape != (encoder_out.shape[2], 2 * C):
        raise ValueError(f"cross-attention: encoder output {tuple(encoder_out.shape)} and key/value "
                         f"weight {tuple(kv_weight.shape)} do not fit queries {tuple(q.shape)}")
    scale = 1.0 / math.sqrt(C // n_head) if scale is None else scale
    kv, _ = linear_forward(encoder_out, kv_weight, kv_bias)
    k, v = (_heads(half, n_head) for half in (kv[..., :C], kv[..., C:]))
    bias = _score_bias(xp, B, Tq, Tk, q.dtype, key_mask, position_bias, causal=False)
    y, probs, keep_mask = _attend_forward(_heads(q, n_head), k, v, bias, scale, dropout_p, rng)
    bias_shape = None if position_bias is None else position_bias.shape
    return _merge_heads(y), (q, encoder_out, kv, bias_shape, probs, keep_mask)


def cross_attention_backward(dy, cache, kv_weight, n_head, has_kv_bias=True, scale=None):
    """dy (B, Tq, C) -> (dq (B, Tq, C), dencoder_out (B, Tk, Ce), dkv_weight (Ce, 2C),
    dkv_bias (2C,) or None, dposition_bias or None).

    dencoder_out is this layer's share only: a decoder whose layers all read one encoder output
    sums the dencoder_out of every layer before the encoder's backward.
    """
    if is_low_precision(dy):
        grads = cross_attention_backward(dy.astype(np.float32), cache,
                                         kv_weight.astype(np.float32), n_head, has_kv_bias, scale)
        return tuple(None if g is None else g.astype(dy.dtype) for g in grads)
    xp = module_of(dy)
    q, encoder_out, kv, bias_shape, probs, keep_mask = cache
    C = q.shape[-1]
    scale = 1.0 / math.sqrt(C // n_head) if scale is None else scale
    k, v = (_heads(half, n_head) for half in (kv[..., :C], kv[..., C:]))
    dq, dk, dv, dscores = _attend_backward(_heads(dy, n_head), _heads(q, n_head), k, v, probs,
                                           keep_mask, scale)
    dkv = xp.concatenate([_merge_heads(dk), _merge_heads(dv)], axis=-1)
    dencoder_out = linear_backward_input(dkv, kv_weight)
    dkv_weight, dkv_bias = linear_backward_weight(dkv, encoder_out, has_kv_bias)
    dbias = None if bias_shape is None else _sum_to_shape(dscores, bias_shape)
    return _merge_heads(dq), dencoder_out, dkv_weight, dkv_bias, dbias


# ----------------------------------------------------------------------------- T5 position bias

def relative_position_bucket(relative_position, bidirectional, num_buckets=NUM_BUCKETS,
                             max_distance=MAX_DISTANCE):
    """T5's bucket of each relative position (key position - query position), int array -> int64.

    Bidirectional (encoder): half the buckets for keys after the query, half for the rest.
    Unidirectional (decoder): keys after the query all fall in bucket 0. Within a half, distances
    below max_exact = buckets // 2 get a bucket each; longer ones share buckets whose widths grow
    logarithmically up to max_distance, beyond which all share the last. The logarithm is taken in
    float32, as T5 and transformers do, so that distances on a bucket boundary land where they do
    in checkpoints trained there.
    """
    xp = module_of(relative_position)
    relative_position = relative_position.astype(np.int64)
    buckets = xp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0) * num_buckets
        distance = xp.abs(relative_position)
    else:
        distance = xp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    if max_distance <= max_exact:
        raise ValueError(f"relative attention max_distance {max_distance} must exceed the "
                         f"{max_exact} exact buckets of {num_buckets * (2 if bidirectional else 1)}")
    log_ratio = xp.log(xp.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    log_ratio /= np.float32(math.log(max_distance / max_exact))
    log_ratio *= np.float32(num_buckets - max_exact)
    far = xp.minimum(max_exact + log_ratio.astype(np.int64), num_buckets - 1)
    return buckets + xp.where(distance < max_exact, distance, far)


def relative_position_buckets(query_length, key_length, bidirectional, num_buckets=NUM_BUCKETS,
                              max_distance=MAX_DISTANCE, query_offset=0, xp=np):
    """(Tq, Tk) buckets for queries at query_offset + [0, Tq) against keys at [0, Tk)."""
    query = xp.arange(query_offset, query_offset + query_length, dtype=np.int64)[:, None]
    key = xp.arange(key_length, dtype=np.int64)[None, :]
    return relative_position_bucket(key - query, bidirectional, num_buckets, max_distance)


def relative_position_bias_forward(table, buckets):
    """table (num_buckets, H), buckets int (Tq, Tk) -> bias (1, H, Tq, Tk); cache: buckets.

    Computed once (T5's first layer) and added to the scores of every layer of the stack."""
    return table[buckets].transpose(2, 0, 1)[None], buckets


def relative_position_bias_backward(dbias, buckets, num_buckets):
    """dbias (B or 1, H, Tq, Tk), summed over all layers that shared the bias -> dtable
    (num_buckets, H): the gradient of each table row summed over the positions in its bucket."""
    per_position = dbias.sum(axis=0).transpose(1, 2, 0)  # (Tq, Tk, H)
    return embedding_backward(module_of(dbias).ascontiguousarray(per_position), buckets,
                              num_buckets)

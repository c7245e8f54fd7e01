"""BERT's and T5's non-attention ops as forward/backward pairs (llm.c style).

T5: the RMS-style LayerNorm (no bias, no mean subtraction), ReLU and gated-GELU MLP activations.
BERT: the embeddings (word + absolute position + token type, then LayerNorm), the erf GELU, the
masked-LM head (transform, decoder tied to the word embeddings) and its loss on chosen positions.

Each `*_forward` returns `(out, cache)`, the cache naming what the backward needs; the array module
comes from the inputs (NumPy or CuPy). Linear weights use the Conv1D layout of model/nn/ops.py
(in x out); embedding tables are (rows, C).
"""
from __future__ import annotations

import math

import numpy as np

from ringpipe.model.nn.ops import (
    _column_sums, _row_sums, cross_entropy_backward, cross_entropy_forward, embedding_backward,
    gelu_backward, gelu_forward, is_low_precision, layernorm_backward, layernorm_forward,
    linear_backward_input, linear_backward_weight, linear_forward, matmul)
from ringpipe.runtime.array_module import is_device_array, module_of

RMS_NORM_EPS = 1e-6      # T5's layer_norm_epsilon
BERT_LAYERNORM_EPS = 1e-12  # BERT's layer_norm_eps
MLM_IGNORE_INDEX = -100  # labels of positions the masked-LM loss skips (transformers' convention)


# ----------------------------------------------------------------------------- RMS norm (T5)

def rms_norm_forward(x, weight, eps=RMS_NORM_EPS):
    """y = x / sqrt(mean(x^2) + eps) * weight. x (..., C), weight (C,) -> out (..., C);
    cache: (xhat (N, C) = x * rstd, rstd (N, 1)). float16 x: in float32, out rounded."""
    if is_low_precision(x):
        out, cache = rms_norm_forward(x.astype(np.float32), weight.astype(np.float32), eps)
        return out.astype(x.dtype), cache
    xp = module_of(x)
    C = x.shape[-1]
    x2d = x.reshape(-1, C)
    mean_square = _row_sums(x2d * x2d)
    mean_square *= 1.0 / C
    mean_square += eps
    rstd = xp.divide(1.0, xp.sqrt(mean_square))
    xhat = x2d * rstd
    return (xhat * weight).reshape(x.shape), (xhat, rstd)


def rms_norm_backward(dout, cache, weight):
    """dout (..., C) -> dx (..., C), dweight (C,)."""
    if is_low_precision(dout):
        grads = rms_norm_backward(dout.astype(np.float32), cache, weight.astype(np.float32))
        return tuple(g.astype(dout.dtype) for g in grads)
    xhat, rstd = cache
    C = dout.shape[-1]
    dout2d = dout.reshape(-1, C)
    dweight = _column_sums(dout2d * xhat)
    # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * weight
    dxhat = dout2d * weight
    dx = xhat * (_row_sums(dxhat * xhat) * (1.0 / C))
    module_of(dout).subtract(dxhat, dx, out=dx)
    dx *= rstd
    return dx.reshape(dout.shape), dweight


# ----------------------------------------------------------------------------- MLP activations

def relu_forward(x):
    """max(x, 0); cache: the mask x > 0."""
    positive = x > 0
    return x * positive, positive


def relu_backward(dout, positive):
    return dout * positive


def gated_gelu_forward(gate, up):
    """T5 v1.1's gated-GELU: gelu_new(gate) * up, with gate = x W0 and up = x W1 (the caller's two
    linears). gate, up (..., F) -> out (..., F); cache: (GELU's cache, gelu_new(gate), up)."""
    activated, gelu_cache = gelu_forward(gate)
    return activated * up, (gelu_cache, activated, up)


def gated_gelu_backward(dout, cache):
    """dout (..., F) -> dgate, dup."""
    gelu_cache, activated, up = cache
    return gelu_backward(dout * up, gelu_cache), dout * activated


def _erf(x):
    """The error function elementwise, for NumPy or CuPy arrays.

    NumPy has no erf: SciPy's is used where installed, else Python's math.erf element by element
    (exact, slow: about 0.1 s per million elements).
    """
    if is_device_array(x):
        from cupyx.scipy.special import erf
        return erf(x)
    try:
        from scipy.special import erf
    except ImportError:
        return _math_erf(x).astype(x.dtype)
    return erf(x)


_math_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf_forward(x):
    """BERT's "gelu": x * Phi(x), Phi the standard normal CDF. cache: (x, Phi(x))."""
    cdf = _erf(x * (1.0 / math.sqrt(2.0)))
    cdf += 1.0
    cdf *= 0.5
    return x * cdf, (x, cdf)


def gelu_erf_backward(dout, cache):
    """dout -> dx = dout * (Phi(x) + x * phi(x)), phi the standard normal density."""
    x, cdf = cache
    density = module_of(x).exp(-0.5 * x * x)
    density *= 1.0 / math.sqrt(2.0 * math.pi)
    density *= x
    density += cdf
    density *= dout
    return density


# ----------------------------------------------------------------------------- BERT embeddings

def bert_embeddings_forward(input_ids, token_type_ids, word_weight, position_weight, type_weight,
                            ln_weight, ln_bias, eps=BERT_LAYERNORM_EPS):
    """LayerNorm(word[ids] + position[0..T) + type[token_type_ids]).

    input_ids int (B, T); token_type_ids int (B, T) or None (all type 0); word_weight (V, C),
    position_weight (P, C), type_weight (NT, C) -> out (B, T, C);
    cache: (input_ids, token_type_ids, LayerNorm's cache). Raises ValueError when T > P.
    """
    xp = module_of(word_weight)
    B, T = input_ids.shape
    if T > position_weight.shape[0]:
        raise ValueError(f"sequence of {T} tokens is longer than the position table "
                         f"({position_weight.shape[0]} positions)")
    if token_type_ids is None:
        token_type_ids = xp.zeros((B, T), dtype=np.int64)
    embedded = word_weight[input_ids] + type_weight[token_type_ids]
    embedded += position_weight[:T]
    out, ln_cache = layernorm_forward(embedded, ln_weight, ln_bias, eps)
    return out, (input_ids, token_type_ids, ln_cache)


def bert_embeddings_backward(dout, cache, ln_weight, vocab_size, max_positions, type_vocab_size):
    """dout (B, T, C) -> dword (V, C), dposition (P, C), dtype (NT, C), dln_weight, dln_bias."""
    input_ids, token_type_ids, ln_cache = cache
    dembedded, dln_weight, dln_bias = layernorm_backward(dout, ln_cache, ln_weight)
    dword = embedding_backward(dembedded, input_ids, vocab_size)
    dtype = embedding_backward(dembedded, token_type_ids, type_vocab_size)
    T, C = dout.shape[1:]
    dposition = module_of(dout).zeros((max_positions, C), dtype=dword.dtype)
    dposition[:T] = dembedded.sum(axis=0, dtype=dword.dtype)
    return dword, dposition, dtype, dln_weight, dln_bias


# ----------------------------------------------------------------------------- masked-LM head

def mlm_transform_forward(x, dense_weight, dense_bias, ln_weight, ln_bias,
                          eps=BERT_LAYERNORM_EPS):
    """BERT's prediction-head transform: LayerNorm(gelu_erf(x W + b)).
    x (B, T, C), dense_weight (C, C) -> out (B, T, C); cache: (x, GELU's cache, LayerNorm's)."""
    hidden, _ = linear_forward(x, dense_weight, dense_bias)
    activated, gelu_cache = gelu_erf_forward(hidden)
    out, ln_cache = layernorm_forward(activated, ln_weight, ln_bias, eps)
    return out, (x, gelu_cache, ln_cache)


def mlm_transform_backward(dout, cache, dense_weight, ln_weight):
    """dout (B, T, C) -> dx, ddense_weight, ddense_bias, dln_weight, dln_bias."""
    x, gelu_cache, ln_cache = cache
    dactivated, dln_weight, dln_bias = layernorm_backward(dout, ln_cache, ln_weight)
    dhidden = gelu_erf_backward(dactivated, gelu_cache)
    ddense_weight, ddense_bias = linear_backward_weight(dhidden, x)
    return (linear_backward_input(dhidden, dense_weight), ddense_weight, ddense_bias,
            dln_weight, dln_bias)


def tied_decoder_forward(h, word_weight, bias):
    """Logits against the word embeddings: h (B, T, C), word_weight (V, C), bias (V,) ->
    logits (B, T, V); cache: h."""
    logits = matmul(h.reshape(-1, h.shape[-1]), word_weight.T)
    logits += bias
    return logits.reshape(*h.shape[:-1], word_weight.shape[0]), h


def tied_decoder_backward(dlogits, h, word_weight):
    """dlogits (B, T, V) -> dh (B, T, C), dword_weight (V, C) (to add to the embedding's), dbias."""
    dlogits2d = dlogits.reshape(-1, dlogits.shape[-1])
    dh = matmul(dlogits2d, word_weight).reshape(h.shape)
    dword_weight = matmul(dlogits2d.T, h.reshape(-1, h.shape[-1]))
    return dh, dword_weight, _column_sums(dlogits2d)


def masked_lm_loss_forward(logits, labels):
    """Mean cross-entropy over the chosen positions: labels (B, T) hold the original token where a
    position was chosen and MLM_IGNORE_INDEX elsewhere. -> loss (float); cache as
    ops.cross_entropy_forward's (0.0 when no position is chosen)."""
    return cross_entropy_forward(logits, labels, ignore_index=MLM_IGNORE_INDEX)


def masked_lm_loss_backward(cache, dloss=1.0):
    """-> dlogits (B, T, V), zero at the positions not chosen."""
    return cross_entropy_backward(cache, dloss)

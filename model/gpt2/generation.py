"""Sampling from a dense GPT with a KV cache: `prefill` a prompt, then `decode_step` a token at a
time.

The GPT methods of the same names call these; `gpt` is a `model.gpt2.model.GPT`.
"""
from __future__ import annotations


import numpy as np

from ringpipe.model.nn import causal_attention, ops
from ringpipe.runtime.array_module import to_host


def prefill(gpt, idx):
    """Runs idx int (B, T) through the model, keeping each layer's keys and values.

    -> (logits (B, T, V), kv) where kv is the cache that `decode_step` extends.
    """
    B, T = idx.shape
    C, H = gpt.config.n_embd, gpt.config.n_head
    shape = (B, H, gpt.config.block_size, C // H)
    kv = {"length": 0, "layers": [(gpt.xp.empty(shape, gpt.dtype),
                                   gpt.xp.empty(shape, gpt.dtype))
                                  for _ in range(gpt.config.n_layer)]}
    return _forward_with_kv(gpt, idx, kv), kv


def decode_step(gpt, kv, tokens):
    """tokens int (B,) at position kv["length"] -> logits (B, V), using and extending kv."""
    return _forward_with_kv(gpt, tokens[:, None], kv)[:, -1]


def _forward_with_kv(gpt, idx, kv):
    xp, p, H = gpt.xp, gpt.params, gpt.config.n_head
    B, T = idx.shape
    start = kv["length"]
    if start + T > gpt.config.block_size:
        raise ValueError(f"KV cache holds {start} of block_size {gpt.config.block_size}; "
                         f"cannot add {T} more positions")
    x = p["wte.weight"][idx] + p["wpe.weight"][start:start + T]
    # Query t (absolute start + t) may see keys 0 .. start + t.
    bias = xp.triu(xp.full((T, start + T), -xp.inf, dtype=gpt.dtype), k=start + 1)
    for i, (keys, values) in enumerate(kv["layers"]):
        h = f"h.{i}."
        a, _ = ops.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"],
                                     gpt.config.layer_norm_epsilon)
        qkv, _ = ops.linear_forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
        q, k, v = causal_attention.split_heads(qkv, H)
        keys[:, :, start:start + T] = k
        values[:, :, start:start + T] = v
        scores = q @ keys[:, :, :start + T].swapaxes(-1, -2)
        scores *= gpt.config.attention_scale(i)
        scores += bias
        y = causal_attention.softmax_forward(scores) @ values[:, :, :start + T]
        y = y.transpose(0, 2, 1, 3).reshape(B, T, -1)
        y, _ = ops.linear_forward(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        x, _ = gpt._mlp_half(i, x + y, None)  # the MLP needs no cache of earlier positions
    kv["length"] = start + T
    return gpt.head_logits(x)


def generate(gpt, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
    """Samples max_new_tokens after idx int (B, T) -> (B, T + max_new_tokens).

    temperature 0 picks the most likely token. Context longer than block_size is cropped to
    the last block_size tokens, and the KV cache is rebuilt for that window.
    """
    rng = np.random.default_rng(seed)
    block_size = gpt.config.block_size
    tokens = to_host(idx).astype(np.int64)
    logits, kv = prefill(gpt, gpt.xp.asarray(tokens[:, -block_size:]))
    logits = logits[:, -1]
    for step in range(max_new_tokens):
        next_tokens = _sample(to_host(logits).astype(np.float64), temperature, top_k, rng)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        if step == max_new_tokens - 1:
            break
        if kv["length"] < block_size:
            logits = decode_step(gpt, kv, gpt.xp.asarray(next_tokens))
        else:
            logits = prefill(gpt, gpt.xp.asarray(tokens[:, -block_size:]))[0][:, -1]
    return gpt.xp.asarray(tokens) if gpt.xp is not np else tokens


def _sample(logits, temperature, top_k, rng):
    """logits float64 (B, V) on the host -> token ids int64 (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(-1), logits.shape[-1] - 1).astype(np.int64)

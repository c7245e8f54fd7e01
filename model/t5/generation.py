"""Greedy and sampled decoding from a dense T5: the encoder runs once; the decoder runs a token at
a time with a KV cache for its self-attention and the encoder output's keys and values computed
once per layer for cross-attention.

The T5 method `generate` calls `generate` here; `t5` is a `model.t5.model.T5`.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.inference.sampling import sample_batch
from ringpipe.model.nn import ops
from ringpipe.model.nn.attention_ops import padding_bias
from ringpipe.model.nn.causal_attention import softmax_forward, split_heads
from ringpipe.model.nn.encoder_decoder_ops import rms_norm_forward
from ringpipe.runtime.array_module import to_host


def _heads(x, n_head):
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _attend(q, keys, values, bias):
    """q (B, H, 1, hs), keys/values (B, H, T, hs), bias broadcastable -> (B, 1, H·hs); T5's
    scores are unscaled."""
    scores = q @ keys.swapaxes(-1, -2)
    scores += bias
    y = softmax_forward(scores) @ values
    B, H, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def start(t5, input_ids, attention_mask, max_length: int) -> dict:
    """Runs the encoder once and prepares the caches for up to `max_length` decoder tokens."""
    config, p, H = t5.config, t5.params, t5.config.num_heads
    encoder_out, cache = t5.encode(input_ids, attention_mask)
    t5._release(cache)
    B = input_ids.shape[0]
    cross = []
    for i in range(config.num_decoder_layers):
        kv = ops.linear_forward(encoder_out, p[f"decoder.{i}.cross.kv.weight"])[0]
        cross.append((_heads(kv[..., :config.inner_dim], H), _heads(kv[..., config.inner_dim:], H)))
    shape = (B, H, max_length, config.d_kv)
    mask = (t5.xp.ones(input_ids.shape) if attention_mask is None else attention_mask)
    return {"length": 0, "cross": cross, "encoder_bias": padding_bias(mask, t5.dtype),
            "self": [(t5.xp.empty(shape, t5.dtype), t5.xp.empty(shape, t5.dtype))
                     for _ in range(config.num_decoder_layers)]}


def decode_step(t5, state, tokens):
    """tokens int (B,) at decoder position state["length"] -> logits (B, V); extends the cache."""
    config, p, H = t5.config, t5.params, t5.config.num_heads
    t = state["length"]
    if t >= state["self"][0][0].shape[2]:
        raise ValueError(f"decoder cache holds {t} tokens, its capacity; cannot add one more")
    x, _ = t5.embed_forward(tokens[:, None])
    bias, _ = t5.position_bias_forward("decoder", 1, t + 1, query_offset=t)  # (1, H, 1, t + 1)
    eps = config.layer_norm_epsilon
    for i, ((keys, values), (cross_keys, cross_values)) in enumerate(zip(state["self"],
                                                                         state["cross"])):
        h = f"decoder.{i}."
        a, _ = rms_norm_forward(x, p[h + "attn_norm.weight"], eps)
        q, k, v = split_heads(ops.linear_forward(a, p[h + "attn.qkv.weight"])[0], H)
        keys[:, :, t:t + 1], values[:, :, t:t + 1] = k, v
        y = _attend(q, keys[:, :, :t + 1], values[:, :, :t + 1], bias)
        x = x + ops.linear_forward(y, p[h + "attn.o.weight"])[0]
        a, _ = rms_norm_forward(x, p[h + "cross_norm.weight"], eps)
        q = _heads(ops.linear_forward(a, p[h + "cross.q.weight"])[0], H)
        y = _attend(q, cross_keys, cross_values, state["encoder_bias"])
        x = x + ops.linear_forward(y, p[h + "cross.o.weight"])[0]
        x, _ = t5.feed_forward_sublayer(h, x)
    state["length"] = t + 1
    return t5.head_logits(t5.final_norm_forward("decoder", x)[0])[:, -1]


def generate(t5, input_ids, max_new_tokens: int, attention_mask=None, temperature=0.0,
             top_k=None, seed=None):
    """Decoder tokens for input_ids int (B, Te) -> (B, 1 + n) starting with the decoder start
    token, n ≤ max_new_tokens: a row that produced EOS is padded after it, and decoding stops
    once every row has. temperature 0 (the default) is greedy."""
    config, xp = t5.config, t5.xp
    rng = np.random.default_rng(seed)
    B = input_ids.shape[0]
    tokens = np.full((B, 1), config.decoder_start_token_id, dtype=np.int64)
    state = start(t5, input_ids, attention_mask, max(max_new_tokens, 1))
    done = np.zeros(B, dtype=bool)
    for _ in range(max_new_tokens):
        logits = to_host(decode_step(t5, state, xp.asarray(tokens[:, -1]))).astype(np.float64)
        chosen = sample_batch(logits, temperature, top_k, rng)
        chosen[done] = config.pad_token_id
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        if config.eos_token_id is not None:
            done |= chosen == config.eos_token_id
        if done.all():
            break
    return xp.asarray(tokens) if xp is not np else tokens

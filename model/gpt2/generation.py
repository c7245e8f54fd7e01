"""Sampling from a dense GPT with a KV cache: `prefill` a prompt, then `decode_step` a token at a
time.

The GPT methods of the same names call these; `gpt` is a `model.gpt2.model.GPT`. The cached forward
is model/inference/kv_cache.py's, the same a rank's stage runs when generating across workers.
"""
from __future__ import annotations


import numpy as np

from ringpipe.model.inference.kv_cache import forward_cached, new_kv_cache
from ringpipe.model.inference.sampling import sample_batch
from ringpipe.runtime.array_module import to_host


def prefill(gpt, idx):
    """Runs idx int (B, T) through the model, keeping each layer's keys and values.

    -> (logits (B, T, V), kv) where kv is the cache that `decode_step` extends.
    """
    kv = new_kv_cache(gpt, idx.shape[0], range(gpt.config.n_layer))
    return forward_cached(gpt, idx, kv, kv["layers"], all_positions=True), kv


def decode_step(gpt, kv, tokens):
    """tokens int (B,) at position kv["length"] -> logits (B, V), using and extending kv."""
    return forward_cached(gpt, tokens[:, None], kv, kv["layers"])


def generate(gpt, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
    """Samples max_new_tokens after idx int (B, T) -> (B, T + max_new_tokens).

    temperature 0 picks the most likely token. Context longer than block_size is cropped to
    the last block_size tokens, and the KV cache is rebuilt for that window.
    """
    rng = np.random.default_rng(seed)
    block_size, layers = gpt.config.block_size, range(gpt.config.n_layer)
    tokens = to_host(idx).astype(np.int64)
    kv = new_kv_cache(gpt, tokens.shape[0], layers)
    logits = forward_cached(gpt, gpt.xp.asarray(tokens[:, -block_size:]), kv, layers)  # the last position's
    for step in range(max_new_tokens):
        next_tokens = sample_batch(to_host(logits).astype(np.float64), temperature, top_k, rng)
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=1)
        if step == max_new_tokens - 1:
            break
        if kv["length"] < block_size:
            logits = decode_step(gpt, kv, gpt.xp.asarray(next_tokens))
        else:  # the window again, into an emptied cache
            kv["length"] = 0
            logits = forward_cached(gpt, gpt.xp.asarray(tokens[:, -block_size:]), kv, layers)
    return gpt.xp.asarray(tokens) if gpt.xp is not np else tokens

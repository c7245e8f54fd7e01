"""One stage's inference over new positions with a KV cache, written once for the dense model and
for a rank's stage of a layout.

`pieces` is the dense GPT or a stage's pieces (model/parallel/plan.py) that also have

    embedding_at(idx, start) -> x (B, T, C)                 token ids at positions start .. start + T
    block_forward_cached(i, x, (keys, values), start) -> x  writes the new positions' keys and values
    head_logits(x) -> logits (B, T, vocab)                  gathered over tensor-parallel ranks
    config (block_size, n_head, n_embd, dtype), local_heads, xp

A cache holds, for each of the stage's layers, keys and values (B, local_heads, block_size, head
size): a tensor-parallel rank keeps only its heads, as c_attn's columns are split.
"""
from __future__ import annotations

import numpy as np


def supports_cached_generation(pieces) -> bool:
    """Whether `pieces` have what generation with a KV cache needs."""
    return all(hasattr(pieces, name) for name in ("embedding_at", "block_forward_cached", "head_logits"))


def new_kv_cache(pieces, batch: int, layers) -> dict:
    """{"length": 0, "layers": {i: (keys, values)}} for `batch` sequences through `layers`."""
    config, xp = pieces.config, pieces.xp
    shape = (batch, pieces.local_heads, config.block_size, config.n_embd // config.n_head)
    dtype = np.dtype(config.dtype)
    return {"length": 0, "layers": {i: (xp.empty(shape, dtype), xp.empty(shape, dtype)) for i in layers}}


def forward_cached(pieces, inputs, kv: dict, layers, first: bool = True, last: bool = True,
                   all_positions: bool = False):
    """Runs positions kv["length"] .. + T through a stage, extending kv.

    inputs: token ids int (B, T) on the first stage, else hidden states (B, T, C). Returns the last
    stage's logits of the last position (B, V), or of every position (B, T, V) with `all_positions`;
    hidden states (B, T, C) on other stages. ValueError if the cache has no room for T positions."""
    start, length = kv["length"], inputs.shape[1]
    if start + length > pieces.config.block_size:
        raise ValueError(f"KV cache holds {start} of block_size {pieces.config.block_size}; "
                         f"cannot add {length} more positions")
    x = pieces.embedding_at(inputs, start) if first else inputs
    for i in layers:
        x = pieces.block_forward_cached(i, x, kv["layers"][i], start)
    kv["length"] = start + length
    if not last:
        return x
    return pieces.head_logits(x) if all_positions else pieces.head_logits(x[:, -1:])[:, 0]

"""How a parameter is cut across the tensor-parallel ranks, and how the driver puts it back.

A model family's parallel plan (model/parallel/plan.py) gives every parameter a `Sharding`; the
functions here act on that description only, so they name no weight of any family.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Sharding(NamedTuple):
    """How one parameter is held across the tensor-parallel group.

    kind               "replicated", "column" (output features split), "row" (input features split),
                       or "vocab" (embedding rows split; the vocabulary is zero-padded to a multiple of tp)
    axis               the array axis that is split; None when replicated
    parts              equal groups of that axis, each split across the ranks (3 for a fused [q | k | v])
    sequence_partial   a replicated parameter applied to activations that sequence parallelism shards
                       (LayerNorms, position embeddings): each rank's gradient covers its positions only
                       and is summed over tp
    """
    kind: str = "replicated"
    axis: int | None = None
    parts: int = 1
    sequence_partial: bool = False


REPLICATED = Sharding()


def column_parallel(axis: int, parts: int = 1) -> Sharding:
    """A column-parallel weight (or bias) split along `axis`, in `parts` equal groups."""
    return Sharding("column", axis, parts)


def row_parallel(axis: int = 0) -> Sharding:
    """A row-parallel weight: input features split along `axis`."""
    return Sharding("row", axis)


def vocab_parallel(axis: int = 0) -> Sharding:
    """An embedding split by vocabulary rows."""
    return Sharding("vocab", axis)


def shard_indices(length: int, parts: int, rank: int, size: int):
    """The indices along the split axis that `shard` gives `rank` (an axis without padding)."""
    if length % (size * parts):
        raise ValueError(f"shard_indices: length {length} is not a multiple of tp {size} x {parts} parts")
    return np.arange(length).reshape(parts, size, -1)[:, rank].reshape(-1)


def shard(full, sharding: Sharding, rank: int, size: int):
    """This rank's slice of a full parameter-shaped array; the axis is zero-padded to a multiple of size."""
    axis, parts = sharding.axis, sharding.parts
    if axis is None:
        return full
    if hasattr(full, "select"):  # a quantized weight (model/quantization/int8.py) cuts itself
        return full.select(axis, shard_indices(full.shape[axis], parts, rank, size))
    length = full.shape[axis]
    padded = -(-length // (size * parts)) * size * parts
    if padded != length:
        widths = [(0, 0)] * full.ndim
        widths[axis] = (0, padded - length)
        full = np.pad(full, widths)
    groups = np.split(full, parts, axis=axis)
    return np.concatenate([np.split(group, size, axis=axis)[rank] for group in groups], axis=axis)


def shard_shape(full_shape, sharding: Sharding, size: int) -> tuple:
    """The shape of a rank's `shard` of an array of `full_shape` (padding included), without one."""
    shape = list(full_shape)
    if sharding.axis is not None:
        shape[sharding.axis] = -(-shape[sharding.axis] // (size * sharding.parts)) * sharding.parts
    return tuple(shape)


def shard_table(shardings: dict, full_shapes: dict, rank: int, size: int) -> dict:
    """{name: {"axis", "parts", "tp_rank", "tp_size", "full_shape"}}: enough to reassemble the full
    parameters from every rank's shards (`assemble_full_params`)."""
    return {name: {"axis": s.axis, "parts": s.parts if s.axis is not None else 1, "tp_rank": rank,
                   "tp_size": size, "full_shape": list(full_shapes[name])} for name, s in shardings.items()}


def assemble_full_params(per_rank_params: list, per_rank_tables: list) -> dict:
    """Driver side: the full parameters from every rank's `local_params()` and `shard_table()`.
    Replicas of the same piece (data-parallel, replicated params) must agree bitwise."""
    pieces = {}  # name -> {tp_rank: array}
    entries = {}
    for params, table in zip(per_rank_params, per_rank_tables):
        for name, value in params.items():
            entry = table[name]
            seen = pieces.setdefault(name, {})
            if entry["tp_rank"] in seen:
                np.testing.assert_array_equal(seen[entry["tp_rank"]], value, err_msg=f"replicas of {name}")
            seen[entry["tp_rank"]] = np.asarray(value)
            entries[name] = entry
    full = {}
    for name, by_rank in pieces.items():
        entry = entries[name]
        axis, parts, size = entry["axis"], entry["parts"], entry["tp_size"]
        if axis is None:
            full[name] = by_rank[min(by_rank)]
            continue
        if sorted(by_rank) != list(range(size)):
            raise ValueError(f"assemble_full_params: {name} has shards of tp ranks {sorted(by_rank)}, "
                             f"expected 0..{size - 1}")
        split = [np.split(by_rank[r], parts, axis=axis) for r in range(size)]
        groups = [np.concatenate([split[r][p] for r in range(size)], axis=axis) for p in range(parts)]
        whole = np.concatenate(groups, axis=axis)
        full[name] = np.take(whole, np.arange(entry["full_shape"][axis]), axis=axis)  # drop vocab padding
    return full


def assemble_full_optimizer_state(per_rank_states: list, per_rank_tables: list) -> dict:
    """Driver side: the full AdamW state ("step", "m.NAME", "v.NAME") from every rank's
    `optimizer_state()` and `shard_table()` (the moments are sharded like their parameters)."""
    # "step" and anything else whole on every rank (a mixed run's loss-scaler state)
    full = {key: value for key, value in per_rank_states[0].items() if not key.startswith(("m.", "v."))}
    for moment in ("m", "v"):
        prefix = moment + "."
        parts = [{name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
                 for state in per_rank_states]
        full.update({prefix + name: value for name, value in assemble_full_params(parts, per_rank_tables).items()})
    return full

"""Where a rank's arrays sit inside a model's full tensors: boxes of global coordinates.

A sharded checkpoint stores every tensor as pieces, each a box of the full (global) tensor:

    box = (offsets, lengths)        offsets[i] + lengths[i] <= shape[i] on every axis

A rank's tensor-parallel shard of a parameter is one box, or `parts` boxes for a fused weight
([q | k | v] split by heads), minus the zero rows that pad a vocabulary to a multiple of tp
(`shard_boxes`). A ZeRO-1 optimizer shard covers a flat range of the rank's shard in C order,
which `flat_range_boxes` cuts into at most 2·ndim - 1 boxes. Pure functions, no I/O.
"""
from __future__ import annotations

import math

Box = tuple  # (offsets tuple, lengths tuple)


def volume(lengths) -> int:
    return math.prod(lengths)


def box_slices(offsets, lengths) -> tuple:
    return tuple(slice(o, o + n) for o, n in zip(offsets, lengths))


def intersect(a: Box, b: Box) -> Box | None:
    """The box both `a` and `b` cover, or None."""
    starts = [max(x, y) for x, y in zip(a[0], b[0])]
    stops = [min(x + m, y + n) for x, m, y, n in zip(a[0], a[1], b[0], b[1])]
    if any(stop <= start for start, stop in zip(starts, stops)):
        return None
    return tuple(starts), tuple(stop - start for start, stop in zip(starts, stops))


def flat_range_boxes(shape, start: int, stop: int) -> list[Box]:
    """Elements [start, stop) of a C-order array of `shape`, as boxes in order: each box's
    elements are the next contiguous run of the range, so the range's values split into the
    boxes by consecutive slices."""
    shape = tuple(shape)
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    row = math.prod(shape[1:])
    first, last = start // row, (stop - 1) // row
    if first == last:  # inside one row: recurse into it
        return [((first, *o), (1, *n)) for o, n in flat_range_boxes(shape[1:], start - first * row,
                                                                     stop - first * row)]
    boxes = []
    whole_from, whole_to = -(-start // row), stop // row
    if start % row:
        boxes += flat_range_boxes(shape, start, whole_from * row)
    if whole_to > whole_from:
        boxes.append(((whole_from, *[0] * (len(shape) - 1)), (whole_to - whole_from, *shape[1:])))
    if stop % row:
        boxes += flat_range_boxes(shape, whole_to * row, stop)
    return boxes


def shard_boxes(full_shape, axis: int | None, parts: int, tp_rank: int, tp_size: int) -> list[tuple]:
    """[(local box, global box)]: where the parts of a rank's tensor-parallel shard (as
    model.parallel.tensor_parallel.sharding.shard cuts it: the axis zero-padded to a multiple of
    tp × parts, `parts` equal groups, each split across the ranks) lie in the full tensor. Padding
    rows belong to no global box."""
    full_shape = tuple(full_shape)
    if axis is None:
        whole = ((0,) * len(full_shape), full_shape)
        return [(whole, whole)]
    length = full_shape[axis]
    padded = -(-length // (tp_size * parts)) * tp_size * parts
    width = padded // (tp_size * parts)
    pairs = []
    for part in range(parts):
        begin = part * (padded // parts) + tp_rank * width
        end = min(begin + width, length)
        if end <= begin:
            continue
        local_offsets = [0] * len(full_shape)
        local_offsets[axis] = part * width
        global_offsets = [0] * len(full_shape)
        global_offsets[axis] = begin
        lengths = list(full_shape)
        lengths[axis] = end - begin
        pairs.append(((tuple(local_offsets), tuple(lengths)), (tuple(global_offsets), tuple(lengths))))
    return pairs


def local_shape(full_shape, axis: int | None, parts: int, tp_size: int) -> tuple:
    """The shape of a rank's shard (padding included)."""
    shape = list(full_shape)
    if axis is not None:
        shape[axis] = -(-shape[axis] // (tp_size * parts)) * parts
    return tuple(shape)


def local_to_global(box: Box, pairs: list[tuple]) -> list[tuple]:
    """[(part of `box` in local coordinates, the same part in global coordinates)] for a box of a
    rank's shard, given its `shard_boxes` pairs (padding rows drop out)."""
    out = []
    for local, global_ in pairs:
        common = intersect(box, local)
        if common is None:
            continue
        shift = [g - l for g, l in zip(global_[0], local[0])]
        out.append((common, (tuple(o + s for o, s in zip(common[0], shift)), common[1])))
    return out

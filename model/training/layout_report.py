"""The layout report a parallel run prints before it starts: the mesh, the pipeline split and the
bytes each stage and rank carries, e.g.

    layout: dp 1 × tp 2 × pp 2 (1f1b), 4 workers; blocks per stage 11,13 (balanced by weight and
    AdamW bytes); parameters per stage ...
"""
from __future__ import annotations

import math

import numpy as np

from ringpipe.model.nn.mixed_precision import is_mixed, weights_dtype
from ringpipe.model.parallel.pipeline_parallel.schedules import split_layers, stage_rank
from ringpipe.model.parallel.plan import stage_param_names, stage_sizes


def stage_parameter_elements(plan, layout) -> tuple[list[range], list[int]]:
    """(blocks of each pipeline stage, parameter elements of each stage) as ParallelTrainer splits them."""
    num_stages = layout.pp * layout.virtual_stages
    ranges = split_layers(plan.num_layers, num_stages, layout.split, **stage_sizes(plan))
    shapes = plan.param_shapes()
    elements = [sum(math.prod(shapes[name])
                    for name in stage_param_names(plan, layers, stage == 0, stage == num_stages - 1))
                for stage, layers in enumerate(ranges)]
    return ranges, elements


def state_bytes_per_element(train_dtype: str, optimizer_shards: int = 1) -> tuple[float, float]:
    """(weight bytes, weights + gradients + AdamW moments bytes) per parameter element; a mixed run
    adds float32 master weights and gradients to its float16 ones; ZeRO-1 divides the moments by
    `optimizer_shards` (dp)."""
    master = np.dtype(weights_dtype(train_dtype)).itemsize
    weight = master + (2 if is_mixed(train_dtype) else 0)
    return weight, 2 * weight + 2 * master / optimizer_shards


def describe_layout(plan, layout, train_dtype: str) -> str:
    """One paragraph: the mesh, the split, bytes per stage and per rank (a tp shard of the stages it
    holds, counting the LayerNorms and biases every tp rank replicates as shared, so a little low),
    and what one process would need."""
    p, v, tp = layout.pp, layout.virtual_stages, layout.tp
    mesh = (f"layout: dp {layout.dp} × tp {tp} × pp {p}" + (f" × {v} virtual stages" if v > 1 else "")
            + (f" ({layout.schedule})" if p > 1 else "")  # no stages, no schedule to name
            + f", {layout.world_size} workers; blocks per stage ")
    if not hasattr(plan, "param_shapes"):  # a family that does not say its shapes: split by count
        ranges = split_layers(plan.num_layers, p * v, layout.split)
        return mesh + ",".join(str(len(r)) for r in ranges) + (" (as --split)" if layout.split else " (balanced by count)")
    ranges, elements = stage_parameter_elements(plan, layout)
    weight, state = state_bytes_per_element(train_dtype, layout.dp if layout.zero else 1)
    per_rank = [sum(elements[s] for s in range(p * v) if stage_rank(s, p) == r) / tp for r in range(p)]
    # the last rank keeps no AdamW moments for a tied weight (the first stage updates it)
    tied = sum(math.prod(plan.param_shapes()[name]) for name in plan.tied_params) / tp if p > 1 else 0
    state_per_rank = [e * state - (tied * (state - 2 * weight) if r == p - 1 else 0) for r, e in enumerate(per_rank)]
    how = "as --split" if layout.split else ("balanced by weight and AdamW bytes" if stage_sizes(plan) else
                                             "balanced by count")
    total = sum(math.prod(shape) for shape in plan.param_shapes().values())

    def gib(values):  # in the unit of the largest value
        values = list(values)
        unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                           if max(values) >= s or s == 1)
        return ", ".join(f"{value / scale:.2f}" for value in values) + " " + unit

    return (mesh + ",".join(str(len(r)) for r in ranges) + f" ({how}); parameters per stage "
            + gib(e * weight for e in elements) + f" ({train_dtype}), per rank {gib(e * weight for e in per_rank)}; "
            + f"weights + gradients + AdamW per rank {gib(state_per_rank)}"
            + (f" (moments ÷ dp {layout.dp}, ZeRO-1)" if layout.zero else "")
            + f"; one process would need {gib([total * state_bytes_per_element(train_dtype)[1]])}")

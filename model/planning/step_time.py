"""Step time of a layout on a machine: compute from the calibration (or the spec), communication per
placement, overlap as the executor does it, and the pipeline bubble from the schedule simulator fed
with those costs.

    timing = predict_step(inventory, candidate, batch_size, machine)
    timing.seconds, timing.tokens_per_second, timing.mfu, timing.parts

Placement: the mesh puts tp innermost, then dp, then pp (model/parallel/mesh.py), on consecutive
ranks of consecutive hosts, so a group crosses hosts when its span of ranks does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ringpipe.model.parallel.pipeline_parallel.schedules import Kind
from ringpipe.model.planning.memory import Candidate, rank_parameters, rank_stages, stage_elements, stage_ranges
from ringpipe.model.planning.pipeline_timing import pipeline_time


@dataclass
class StepTiming:
    seconds: float
    tokens_per_second: float
    mfu: float
    model_flops: float  # per step, forward + backward, no recompute
    parts: dict = field(default_factory=dict)  # name -> seconds on the critical path
    bubble_fraction: float = 0.0

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "tokens_per_second": self.tokens_per_second, "mfu": self.mfu,
                "bubble_fraction": self.bubble_fraction, "parts": dict(self.parts)}


def crosses_hosts(span: int, ranks_per_host: int) -> bool:
    """Whether a group spanning `span` consecutive ranks leaves its host."""
    return span > ranks_per_host


def piece_seconds(inventory, machine, piece: str, B: int, T: int, tp: int) -> dict:
    """{"forward", "backward_input", "backward_weight"} seconds of one piece ("block", "head",
    "embedding") for a micro-batch of B rows on one tp rank: measured by calibration when it timed
    this model at B rows, else modelled (backward = 2 × forward, split evenly between B and W)."""
    config_dtype = inventory.config.dtype
    flops = {"block": inventory.block_flops(B, T, tp), "head": inventory.head_flops(B, T, tp),
             "embedding": 0.0}[piece]
    elements = {"block": inventory.block_elements(B, T, tp),
                "head": B * T * (2 * inventory.config.n_embd + 3 * -(-inventory.config.vocab_size // tp)),
                "embedding": 3 * B * T * inventory.config.n_embd}[piece]
    measured = _measured_piece(inventory, machine, piece, B)
    if measured is not None:
        dense_flops = {"block": inventory.block_flops(B, T), "head": inventory.head_flops(B, T),
                       "embedding": 0.0}[piece]
        dense_elements = {"block": inventory.block_elements(B, T),
                          "head": B * T * (2 * inventory.config.n_embd + 3 * inventory.config.vocab_size),
                          "embedding": elements}[piece]
        # a tp rank's share: the modelled cost of its shard over the modelled cost of the whole
        share = (machine.compute_seconds(flops, elements, config_dtype) /
                 max(machine.compute_seconds(dense_flops, dense_elements, config_dtype), 1e-30))
        return {kind: seconds * share for kind, seconds in measured.items()}
    forward = machine.compute_seconds(flops, elements, config_dtype)
    return {"forward": forward, "backward_input": forward, "backward_weight": forward}


def _measured_piece(inventory, machine, piece, B):
    compute = (machine.calibration or {}).get("compute")
    if not compute or compute.get("model") != architecture_key(inventory):
        return None
    return compute.get("pieces", {}).get(f"{piece}|{B}")


def architecture_key(inventory) -> dict:
    """What a calibration's piece timings depend on: the model's family, shape, dtype and dropout."""
    c = inventory.config
    return {"family": inventory.family, "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "block_size": c.block_size, "vocab_size": c.vocab_size, "mlp_width": c.mlp_width,
            "dtype": c.dtype, "dropout": c.dropout}


def predict_step(inventory, candidate: Candidate, batch_size: int, machine,
                 ranks_per_host: int | None = None, background_load: float | None = None,
                 probe_ratio: float = 1.0) -> StepTiming:
    """`ranks_per_host`: how many of the layout's ranks share a host (default: as many as fit);
    `background_load`: other work on a cpu host's cores (see `Machine.oversubscription`)."""
    config, c = inventory.config, candidate
    ranks_per_host = ranks_per_host or min(c.world_size, machine.devices_per_host)
    dtype = np.dtype(config.dtype)
    B, T, C = batch_size // (c.dp * c.microbatches), config.block_size, config.n_embd
    sp = c.sequence_parallel and c.tp > 1
    slow = machine.oversubscription(ranks_per_host, background_load, probe_ratio)
    tp_across, dp_across, pp_across = (crosses_hosts(c.tp, ranks_per_host), crosses_hosts(c.tp * c.dp, ranks_per_host),
                                       crosses_hosts(c.world_size, ranks_per_host))
    activation = B * T * C * dtype.itemsize
    # tensor-parallel regions: per block two each way (sp: an all-gather and a reduce-scatter each)
    if sp:
        region = (machine.collective("all_gather", activation, c.tp, tp_across)
                  + machine.collective("reduce_scatter", activation, c.tp, tp_across))
    else:
        region = machine.collective("all_reduce", activation, c.tp, tp_across)
    block_comm = 2 * region
    pieces = {name: {k: v * slow for k, v in piece_seconds(inventory, machine, name, B, T, c.tp).items()}
              for name in ("block", "head", "embedding")}
    ranges = stage_ranges(inventory, c)
    num_stages = len(ranges)

    def stage_costs(s):
        layers = len(ranges[s])
        block = pieces["block"]
        forward = layers * (block["forward"] + block_comm)
        if c.recompute and c.tp == 1 and "backward_input_recompute" in block:
            # calibrated: the rebuild as the block does it (one half at a time; a tp stage rebuilds
            # both halves at once, one forward: below)
            backward_input = layers * (block["backward_input_recompute"] + 2 * block_comm)
        else:  # modelled: one more forward of the block
            backward_input = layers * (block["backward_input"] + block_comm
                                       + ((block["forward"] + block_comm) if c.recompute else 0.0))
        backward_weight = layers * block["backward_weight"]
        if s == 0:
            forward += pieces["embedding"]["forward"] + (region if c.tp > 1 else 0.0)
            backward_input += pieces["embedding"]["backward_input"] + pieces["embedding"]["backward_weight"]
        if s == num_stages - 1:
            head_comm = 2 * machine.collective("all_reduce", B * T * 8, c.tp, tp_across) + (region if c.tp > 1 else 0)
            forward += pieces["head"]["forward"] + head_comm
            backward_input += pieces["head"]["backward_input"] + pieces["head"]["backward_weight"]
        return {Kind.FORWARD: forward, Kind.BACKWARD_INPUT: backward_input, Kind.BACKWARD_WEIGHT: backward_weight,
                Kind.BACKWARD: backward_input + backward_weight}

    # each piece's gradients are added into the stage's (model/parallel/stage.py), once per
    # micro-batch: the blocks' during backward-weight, the embedding's and head's during backward-input
    accumulate = gradient_pass_seconds(machine, dtype)["accumulate"] * slow

    def with_accumulation(s, stage):
        blocks, ends = stage_elements(inventory, c.tp, ranges[s], s == 0, s == num_stages - 1)
        stage[Kind.BACKWARD_INPUT] += ends * accumulate
        stage[Kind.BACKWARD_WEIGHT] += blocks * accumulate
        stage[Kind.BACKWARD] = stage[Kind.BACKWARD_INPUT] + stage[Kind.BACKWARD_WEIGHT]
        return stage

    costs = {s: with_accumulation(s, stage_costs(s)) for s in range(num_stages)}
    message = B * (T // c.tp if sp else T) * C * dtype.itemsize
    latency = machine.point_to_point(message, pp_across) if c.pp > 1 else 0.0
    makespan, bubble = pipeline_time((c.schedule, c.pp, c.microbatches, c.virtual_stages),
                                     tuple((s, tuple(sorted(costs[s].items()))) for s in range(num_stages)), latency)
    parts = {"pipeline (compute, tp, bubble)": makespan}

    # data-parallel gradients: buckets start during the last micro-batch's backward; a GPU's
    # copy engines overlap them with it, a CPU rank's cores are busy computing, so they add up.
    worst_grads, worst_elements = 0.0, 0
    for rank in range(c.pp):
        mine = rank_stages(inventory, c, rank)
        elements = rank_parameters(inventory, c, rank)[0]
        nbytes = elements * dtype.itemsize
        if c.zero:
            reduce = machine.collective("reduce_scatter", nbytes, c.dp, dp_across)
            gather = machine.collective("all_gather", nbytes, c.dp, dp_across)
        else:
            reduce, gather = machine.collective("all_reduce", nbytes, c.dp, dp_across), 0.0
        overlap = sum(costs[s][Kind.BACKWARD] for s in mine) if machine.kind == "gpu" else 0.0
        exposed = max(0.0, reduce - overlap) + gather
        if exposed >= worst_grads:
            worst_grads, worst_elements = exposed, max(worst_elements, elements)
    parts["data-parallel gradients"] = worst_grads
    if c.pp > 1:  # the tied embedding's gradient, summed over the first and last stage
        parts["tied embedding"] = machine.collective("all_reduce", config.vocab_size * C * dtype.itemsize / c.tp, 2,
                                                     pp_across)
    # the step's passes over the rank's whole gradient and what it updates: zeroing, then the
    # norm, clipping and AdamW (on its 1/dp shard with ZeRO-1)
    parts["optimizer"] = (worst_elements * gradient_pass_seconds(machine, dtype)["zero"]
                          + _optimizer_seconds(machine, worst_elements // (c.dp if c.zero else 1), dtype)) * slow
    seconds = sum(parts.values())
    tokens = batch_size * T
    model_flops = 3 * (config.n_layer * inventory.block_flops(batch_size, T) + inventory.head_flops(batch_size, T))
    return StepTiming(seconds, tokens / seconds, model_flops / (seconds * c.world_size * machine.peak(config.dtype)),
                      model_flops, parts, bubble)


def gradient_pass_seconds(machine, dtype) -> dict:
    """Seconds per element of zeroing a gradient ("zero") and of adding a contribution into it
    ("accumulate"): measured by calibration, else from the memory bandwidth (one write; two reads
    and a write)."""
    measured = (machine.calibration or {}).get("compute", {}).get("gradient_pass_seconds")
    if measured:
        return measured
    return {"zero": dtype.itemsize / machine.memory_bandwidth, "accumulate": 3 * dtype.itemsize / machine.memory_bandwidth}


def _optimizer_seconds(machine, elements, dtype) -> float:
    measured = (machine.calibration or {}).get("compute", {}).get("optimizer_seconds_per_element")
    if measured:
        return elements * measured
    # the norm reads the gradient, clipping reads and writes it, AdamW reads parameter, gradient and
    # two moments and writes three of them back
    return 10 * elements * dtype.itemsize / machine.memory_bandwidth

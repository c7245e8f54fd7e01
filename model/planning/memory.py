"""Memory per rank of a layout, before anything runs: weights, gradients, optimizer state,
activations (walked through the rank's own schedule) and communication buffers.

    memory = layout_memory(inventory, candidate, batch_size)   # one `RankMemory` per pipeline rank
    worst = max(memory, key=lambda m: m.total)

Ranks that differ only in their dp or tp index hold the same bytes, so one entry per pipeline rank
says everything. The activation walk replays the `hold`/`release` calls that `ActivationMemory`
sees, in the order the executor runs the schedule's actions: a forward holds each piece's cache, a
backward-input releases them (a recomputing block holds its rebuilt halves for a moment) and holds
what the weight gradients need until backward-weight.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from ringpipe.model.parallel.data_parallel import DEFAULT_BUCKET_BYTES
from ringpipe.model.parallel.pipeline_parallel.schedules import Kind, build_schedule, split_layers, stage_rank
from ringpipe.model.parallel.plan import stage_param_names, stage_sizes
from ringpipe.model.planning.activations import RINGPIPE_STORAGE, Storage, total_bytes


@dataclass(frozen=True)
class Candidate:
    """One layout the planner weighs: the parallel sizes and how a step runs on them."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    microbatches: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: bool = False

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def label(self) -> str:
        parts = [f"dp{self.dp} tp{self.tp} pp{self.pp}"]
        if not self.microbatches:  # refused on its sizes alone
            return parts[0]
        if self.pp > 1:
            parts.append(self.schedule + (f"×{self.virtual_stages}" if self.virtual_stages > 1 else ""))
        parts.append(f"mb{self.microbatches}")
        parts += [flag for flag, on in (("zero1", self.zero), ("sp", self.sequence_parallel),
                                        ("recompute", self.recompute)) if on]
        return " ".join(parts)


@dataclass
class RankMemory:
    """Bytes one rank holds at its peak, split by what they are for."""
    pp_rank: int
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0  # peak of the caches held between forward and backward
    communication: int = 0  # gradient buckets in flight, pipeline messages
    workspace: int = 0  # the largest temporaries of one piece's backward
    # a CPU rank's high-water mark as its process holds it (see `host_peak`)
    host_peak: int = 0
    stage_peaks: dict = field(default_factory=dict)  # stage -> its own activation peak

    @property
    def total(self) -> int:
        """Bytes held while training."""
        return (self.weights + self.gradients + self.optimizer + self.activations + self.communication
                + self.workspace)

    @property
    def peak(self) -> int:
        """The rank's high-water mark on a CPU: training, or building the trainer when that holds more."""
        return max(self.total, self.host_peak)

    def as_dict(self) -> dict:
        return {"pp_rank": self.pp_rank, "weights": self.weights, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations,
                "communication": self.communication, "workspace": self.workspace, "total": self.total,
                "host_peak": self.host_peak, "peak": self.peak}


def local_elements(inventory, tp: int, names) -> int:
    """Elements of `names` one tensor-parallel rank holds (axes padded to a multiple of tp, as
    model/parallel/tensor_parallel/sharding.py pads them)."""
    return sum(_local_size(inventory, tp, name) for name in names)


def _local_size(inventory, tp, name) -> int:
    cache = inventory.__dict__.setdefault("_local_sizes", {})
    key = (tp, name)
    if key not in cache:
        shape = list(inventory.param_shapes()[name])
        sharding = inventory.plan.sharding(name) if tp > 1 else None
        if sharding is not None and sharding.axis is not None:
            unit = tp * sharding.parts
            shape[sharding.axis] = -(-shape[sharding.axis] // unit) * unit // tp
        cache[key] = math.prod(shape)
    return cache[key]


@functools.lru_cache(maxsize=4096)
def schedule_of(name: str, pp: int, microbatches: int, virtual_stages: int):
    """build_schedule, remembered: the planner asks for the same few schedules many times."""
    return build_schedule(name, pp, microbatches, virtual_stages)


def stage_ranges(inventory, candidate: Candidate) -> list[range]:
    """The blocks of each pipeline stage, as the trainer splits them by default (parameter bytes balanced)."""
    return split_layers(inventory.plan.num_layers, candidate.pp * candidate.virtual_stages, None,
                        **stage_sizes(inventory.plan))


def layout_memory(inventory, candidate: Candidate, batch_size: int, storage: Storage = RINGPIPE_STORAGE,
                  bucket_bytes: int = DEFAULT_BUCKET_BYTES, shared_memory_arena: bool = True) -> list[RankMemory]:
    """One `RankMemory` per pipeline rank of `candidate` for a global batch of `batch_size` rows.
    `shared_memory_arena`: collectives run through the same-host runtime's arena (CPU workers), not
    in place on a GPU."""
    config, c = inventory.config, candidate
    dtype = np.dtype(config.dtype)
    mixed = dtype.itemsize < 4  # float16 weights with float32 master weights and gradients
    B, T = batch_size // (c.dp * c.microbatches), config.block_size
    ranges = stage_ranges(inventory, c)
    num_stages = len(ranges)
    schedule = schedule_of(c.schedule, c.pp, c.microbatches, c.virtual_stages)
    result = []
    for rank in range(c.pp):
        mine = [s for s in range(num_stages) if stage_rank(s, c.pp) == rank]
        names = {n for s in mine for n in stage_param_names(inventory.plan, ranges[s], s == 0, s == num_stages - 1)}
        elements = local_elements(inventory, c.tp, names)
        memory = RankMemory(rank, weights=elements * dtype.itemsize, gradients=elements * dtype.itemsize)
        master = 4 if mixed else dtype.itemsize
        if mixed:
            memory.weights += elements * 4
            memory.gradients += elements * 4
        # AdamW: m and v; ZeRO-1 keeps them and a per-element decay rate for its 1/dp shard only. Only
        # the first stage keeps them for a tied weight (model/parallel/data_parallel).
        tied_here = names & set(inventory.plan.tied_params) if 0 not in mine else set()
        updated = elements - local_elements(inventory, c.tp, tied_here)
        memory.optimizer = (3 * -(-updated // c.dp) if c.zero else 2 * updated) * master
        stage_bytes = {s: _stage_bytes(inventory, c, B, T, ranges[s], s == 0, s == num_stages - 1, storage)
                       for s in mine}
        memory.activations, memory.stage_peaks = _walk(schedule[rank], stage_bytes)
        memory.communication = _communication_bytes(c, B, T, config, dtype, bucket_bytes,
                                                    elements if shared_memory_arena else 0)
        memory.workspace = _workspace_bytes(inventory, c, B, T, dtype, any(s == num_stages - 1 for s in mine))
        memory.host_peak = host_peak(memory, local_elements(inventory, 1, names), elements, dtype, c.zero, c.tp)
        result.append(memory)
    return result


def host_peak(memory: RankMemory, rank_model_elements: int, elements: int, dtype, zero: int, tp: int) -> int:
    """A CPU rank's high-water mark, which building the trainer sets when the model is large: the
    rank draws the whole (unsharded) initial values of its pipeline stages' parameters (float32 for a
    float32 run, float64 otherwise) while it makes its stage's parameters and gradients
    (zero-filled, so resident) and the flat parameter buffer; the flat gradients are touched only
    once those copies are freed. Tensor-parallel shards are cut through temporaries, which leave
    about one more copy of the rank's share behind in the heap (measured)."""
    itemsize = dtype.itemsize
    drawn = 4 if dtype == np.float32 else 8
    building = drawn * rank_model_elements + 3 * elements * itemsize + (elements * itemsize if tp > 1 else 0)
    if itemsize < 4:
        building += 2 * elements * 4  # float32 master weights and gradients
    return building


def _stage_bytes(inventory, c: Candidate, B, T, layers, first, last, storage):
    """(forward holds in order, backward events in order) of one stage's micro-batch: each event
    ("hold" | "release" | "transient", bytes); a transient is held and released at once."""
    dtype = inventory.config.dtype
    sp = c.sequence_parallel and c.tp > 1
    holds, backward = [], []
    if first:
        holds.append(total_bytes(inventory.embedding_tensors(B, T, c.tp, sp), storage, dtype))
    block = inventory.block_tensors(B, T, c.tp, sp, storage)
    full = total_bytes(block, storage, dtype)
    kept = total_bytes(inventory.recompute_tensors(B, T, c.tp, sp), storage, dtype) if c.recompute else full
    pending = total_bytes(inventory.deferred_tensors(B, T, c.tp), storage, dtype)
    holds += [kept] * len(layers)
    if last:
        holds.append(total_bytes(inventory.head_tensors(B, T, c.tp, sp, storage), storage, dtype))
        backward.append(("release", holds[-1]))
    for _ in layers:
        backward.append(("release", kept))
        if c.recompute:
            backward += [("transient", total_bytes(half, storage, dtype))
                         for half in inventory.recompute_halves(block, c.tp)]
        backward.append(("hold", pending))
    if first:
        backward.append(("release", holds[0]))
    return holds, backward, pending * len(layers)


def _walk(actions, stage_bytes) -> tuple[int, dict]:
    """Peak live activation bytes of a rank (all its stages together) and of each stage alone."""
    live = {s: 0 for s in stage_bytes}
    peaks = dict(live)
    peak = total = 0
    for action in actions:
        s = action.stage
        if action.kind == Kind.FORWARD:
            events = [("hold", nbytes) for nbytes in stage_bytes[s][0]]
        elif action.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            events = stage_bytes[s][1] + ([("release", stage_bytes[s][2])] if action.kind == Kind.BACKWARD else [])
        elif action.kind == Kind.BACKWARD_WEIGHT:
            events = [("release", stage_bytes[s][2])]
        else:
            continue
        for event, nbytes in events:
            if event == "release":
                live[s] -= nbytes
                total -= nbytes
                continue
            live[s] += nbytes
            total += nbytes
            peaks[s] = max(peaks[s], live[s])
            peak = max(peak, total)
            if event == "transient":
                live[s] -= nbytes
                total -= nbytes
    return peak, peaks


def _communication_bytes(c: Candidate, B, T, config, dtype, bucket_bytes, elements) -> int:
    """Buffers of communication. The same-host collectives move every gradient bucket through the
    shared-memory arena, each bucket in blocks of its own while it is in flight (and the backward
    launches them all within the last micro-batch): the rank's own blocks hold its whole flat
    gradient, and it reads its peers' blocks of the part it reduces; the reduced part comes back in
    a buffer of its own. ZeRO-1 then all-gathers the updated parameter shards the same way.
    The pipeline keeps the messages waiting for their action (an activation and a gradient).
    `elements` 0: collectives in place (GPUs)."""
    total = 2 * bucket_bytes if c.dp > 1 and not elements else 0  # in place: a bucket each way
    if c.dp > 1 and elements:
        gradients = elements * dtype.itemsize
        total += int(gradients * (1 + (c.dp - 1) / c.dp + 1 / c.dp))
        if c.zero:  # its own shard's blocks and the peers' shards read: the whole flat buffer again
            total += gradients
    if c.pp > 1:
        positions = T // c.tp if c.sequence_parallel and c.tp > 1 else T
        total += 2 * B * positions * config.n_embd * dtype.itemsize
    return total


def _workspace_bytes(inventory, c: Candidate, B, T, dtype, last: bool) -> int:
    """The largest temporaries of a backward: the GeLU backward's two (B, T, F/t) passes and the
    attention's dqkv in a block; the LM head's weight gradient and input gradient on the last stage."""
    config = inventory.config
    block = B * T * (2 * config.mlp_width + 3 * config.n_embd) // c.tp
    head = (-(-config.vocab_size // c.tp) * config.n_embd + 2 * B * T * config.n_embd) if last else 0
    return max(block, head) * dtype.itemsize

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
    shared_memory: int = 0  # the part of `communication` in the same-host shared-memory arena
    step_only: int = 0  # the part of `communication` held only during the optimizer step (ZeRO-1's gathers)
    workspace: int = 0  # the largest temporaries of one piece's backward
    # a CPU rank's high-water mark as its process holds it (see `host_peak`)
    host_peak: int = 0
    stage_peaks: dict = field(default_factory=dict)  # stage -> its own activation peak

    @property
    def total(self) -> int:
        """Bytes held while training, at the larger of its two phases: the forward and backward
        (activations, workspace, the communication buffers they use) and the optimizer step (what
        only it holds); the arena's pages stay through both."""
        backward = self.activations + self.workspace + self.communication - self.shared_memory - self.step_only
        return (self.weights + self.gradients + self.optimizer + self.shared_memory
                + max(backward, self.step_only))

    @property
    def peak(self) -> int:
        """The rank's high-water mark on a CPU. The process's heap keeps what building the trainer
        freed (large arrays live on the heap: model/gpt2/parallel_plan.py) and training reuses it,
        so the heap peaks at the larger of the two; the shared-memory arena's pages are not heap
        and come on top."""
        return max(self.total - self.shared_memory, self.host_peak) + self.shared_memory

    def as_dict(self) -> dict:
        return {"pp_rank": self.pp_rank, "weights": self.weights, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations,
                "communication": self.communication, "shared_memory": self.shared_memory, "step_only": self.step_only,
                "workspace": self.workspace, "total": self.total,
                "host_peak": self.host_peak, "peak": self.peak}


def _cached(inventory, key, make):
    """`make()`, remembered on `inventory`: the planner asks the same questions of many layouts."""
    cache = inventory.__dict__.setdefault("_planner_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


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
    num_stages = candidate.pp * candidate.virtual_stages
    return _cached(inventory, ("ranges", num_stages), lambda: split_layers(
        inventory.plan.num_layers, num_stages, None, **_cached(inventory, "sizes", lambda: stage_sizes(inventory.plan))))


def rank_stages(inventory, candidate: Candidate, rank: int) -> list[int]:
    """The stages pipeline rank `rank` runs."""
    return [s for s in range(candidate.pp * candidate.virtual_stages) if stage_rank(s, candidate.pp) == rank]


def rank_parameters(inventory, candidate: Candidate, rank: int) -> tuple[int, int, int]:
    """(elements this tensor-parallel rank of pipeline rank `rank` holds, of them those it keeps
    optimizer state for, elements of the same stages unsharded)."""
    def count():
        ranges = stage_ranges(inventory, candidate)
        last = len(ranges) - 1
        mine = rank_stages(inventory, candidate, rank)
        names = {n for s in mine for n in stage_param_names(inventory.plan, ranges[s], s == 0, s == last)}
        stateful = optimizer_state_names(inventory, names, mine, last)
        return (local_elements(inventory, candidate.tp, names), local_elements(inventory, candidate.tp, stateful),
                local_elements(inventory, 1, names))
    return _cached(inventory, ("parameters", candidate.pp, candidate.virtual_stages, rank, candidate.tp), count)


def optimizer_state_names(inventory, names: set, stages: list[int], last_stage: int) -> set:
    """The parameters of a rank's stages it keeps AdamW state for: a tied parameter (on the first
    and the last stage) has state on the first stage only, which updates it and sends the new value
    to the other copy (model/parallel/data_parallel)."""
    if 0 in stages:
        return names
    return names - set(inventory.plan.tied_params)


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
    sp = c.sequence_parallel and c.tp > 1
    result = []
    for rank in range(c.pp):
        mine = rank_stages(inventory, c, rank)
        elements, stateful, dense = rank_parameters(inventory, c, rank)
        memory = RankMemory(rank, weights=elements * dtype.itemsize, gradients=elements * dtype.itemsize)
        master = 4 if mixed else dtype.itemsize
        if mixed:
            memory.weights += elements * 4
            memory.gradients += elements * 4
        # AdamW: m and v; ZeRO-1 keeps them and a per-element decay rate for its 1/dp shard only.
        memory.optimizer = (3 * -(-stateful // c.dp) if c.zero else 2 * stateful) * master
        stage_bytes = {s: _cached(inventory, ("stage bytes", B, T, c.tp, sp, c.recompute, _layers_key(inventory, ranges[s]),
                                              s == 0, s == num_stages - 1, storage),
                                  lambda s=s: _stage_bytes(inventory, c, B, T, ranges[s], s == 0,
                                                           s == num_stages - 1, storage))
                       for s in mine}
        memory.activations, memory.stage_peaks = _walked(c.schedule, c.pp, c.microbatches, c.virtual_stages, rank,
                                                         tuple(sorted(stage_bytes.items())))
        largest = max(_local_size(inventory, c.tp, name) for s in mine
                      for name in stage_param_names(inventory.plan, ranges[s], s == 0, s == num_stages - 1))
        memory.communication, memory.shared_memory, memory.step_only = _communication_bytes(
            c, B, T, config, dtype, bucket_bytes, elements if shared_memory_arena else 0, largest)
        block_gradients = max(stage_elements(inventory, c.tp, ranges[s], s == 0, s == num_stages - 1)[0] for s in mine)
        memory.workspace = max(_workspace_bytes(inventory, c, B, T, dtype, any(s == num_stages - 1 for s in mine)),
                               block_gradients * dtype.itemsize)
        memory.host_peak = host_peak(inventory, dense, elements, dtype)
        result.append(memory)
    return result


def stage_elements(inventory, tp: int, layers: range, first: bool, last: bool) -> tuple[int, int]:
    """(elements of a stage's blocks, of its embedding and head) on one tensor-parallel rank."""
    def count():
        names = stage_param_names(inventory.plan, layers, first, last)
        block_names = {name for i in layers for name in inventory.plan.block_params(i)}
        blocks = local_elements(inventory, tp, [name for name in names if name in block_names])
        return blocks, local_elements(inventory, tp, names) - blocks
    return _cached(inventory, ("stage elements", tp, layers.start, layers.stop, first, last), count)


def _layers_key(inventory, layers: range):
    """What a stage's activations depend on of its blocks: their count where every block is alike,
    else which they are (T5: encoder or decoder layers)."""
    return len(layers) if getattr(inventory, "uniform_layers", True) else (layers.start, layers.stop)


def host_peak(inventory, rank_model_elements: int, elements: int, dtype) -> int:
    """A CPU rank's high-water mark while it builds its trainer (model/training/parallel_trainer.py).

    It draws the initial values: where the plan can draw a part (`init_params_of`), the whole
    (unsharded) parameters of its own stages, in float32 for a float32 run (float64 otherwise), each
    through a float64 temporary that is freed; else the whole model in float64. It cuts its stages'
    parameters from them and makes their zero gradients, then fills the flat parameter buffer and
    zeroes the flat gradient buffer (the buckets' first begin_step) while all of these still live.
    Zero gradients are resident when the allocator hands out freed memory (which it must clear: the
    drawing's temporaries), not when the pages come fresh from the kernel (the whole model drawn
    and kept): four copies of the rank's share then, else three. A mixed run adds its float32 master
    weights and gradients before the drawn values go. Measured: tests/test_planner_memory.py."""
    itemsize = dtype.itemsize
    if hasattr(inventory.plan, "init_params_of"):
        building = rank_model_elements * (4 if dtype == np.float32 else 8) + 4 * elements * itemsize
    else:
        model = _cached(inventory, "model elements", lambda: local_elements(inventory, 1, inventory.param_shapes()))
        building = 8 * model + 3 * elements * itemsize
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
    pending = total_bytes(inventory.deferred_tensors(B, T, c.tp), storage, dtype)
    kept, rebuilt = [], []
    for i in layers:
        block = inventory.block_tensors(B, T, c.tp, sp, storage, layer=i)
        kept.append(total_bytes(inventory.recompute_tensors(B, T, c.tp, sp), storage, dtype) if c.recompute
                    else total_bytes(block, storage, dtype))
        rebuilt.append([total_bytes(half, storage, dtype) for half in inventory.recompute_halves(block, c.tp)]
                       if c.recompute else [])
    holds += kept
    if last:
        holds.append(total_bytes(inventory.head_tensors(B, T, c.tp, sp, storage), storage, dtype))
        backward.append(("release", holds[-1]))
    for layer_kept, halves in zip(reversed(kept), reversed(rebuilt)):
        backward.append(("release", layer_kept))
        backward += [("transient", nbytes) for nbytes in halves]
        backward.append(("hold", pending))
    if first:
        backward.append(("release", holds[0]))
    return tuple(holds), tuple(backward), pending * len(layers)


@functools.lru_cache(maxsize=1 << 14)
def _walked(schedule: str, pp: int, microbatches: int, virtual_stages: int, rank: int, stage_bytes: tuple):
    """`_walk` of rank `rank`'s actions, remembered (layouts differing in dp, ZeRO or the machine share it)."""
    peak, peaks = _walk(schedule_of(schedule, pp, microbatches, virtual_stages)[rank], dict(stage_bytes))
    return peak, peaks


def _walk(actions, stage_bytes) -> tuple[int, dict]:
    """Peak live activation bytes of a rank (all its stages together) and of each stage alone."""
    steps = {s: _action_steps(*entry) for s, entry in stage_bytes.items()}
    live = {s: 0 for s in stage_bytes}
    peaks = dict(live)
    peak = total = 0
    for action in actions:
        step = steps[action.stage].get(action.kind) if action.stage in steps else None
        if step is None:
            continue
        rise, net = step
        s = action.stage
        peaks[s] = max(peaks[s], live[s] + rise)
        peak = max(peak, total + rise)
        live[s] += net
        total += net
    return peak, peaks


def _action_steps(holds, backward, pending) -> dict:
    """Per action kind of a stage: (the highest its live bytes rise within the action, the change
    when it ends), from the action's hold/release/transient events in order."""
    def step(events):
        rise = net = 0
        for event, nbytes in events:
            if event == "release":
                net -= nbytes
                continue
            rise = max(rise, net + nbytes)
            net += nbytes if event == "hold" else 0
        return rise, net

    return {Kind.FORWARD: step([("hold", nbytes) for nbytes in holds]),
            Kind.BACKWARD_INPUT: step(backward), Kind.BACKWARD: step(backward + (("release", pending),)),
            Kind.BACKWARD_WEIGHT: step([("release", pending)])}


def channel_buffer_bytes() -> int:
    """Bytes of one data buffer of a same-host group channel, as the runtime sizes it by default."""
    from ringpipe.runtime.cluster import DEFAULT_ARENA_BYTES
    from ringpipe.runtime.communicator import CommConfig
    from ringpipe.runtime.shm_channel import buffer_bytes_for

    return buffer_bytes_for(DEFAULT_ARENA_BYTES, CommConfig().round_bytes)


def _communication_bytes(c: Candidate, B, T, config, dtype, bucket_bytes, elements,
                         largest_parameter: int = 0) -> tuple[int, int, int]:
    """(bytes of communication buffers, of them in the same-host shared-memory arena, of them held
    only during the optimizer step).

    Same host (`elements` > 0, CPU workers): the dp group's collectives move their data through a
    channel region each member pins in its own arena (runtime/shm_channel.py): two data buffers,
    used by alternate rounds, whose pages are touched as far as a round fills them, and each rank
    reads its peers' buffers. A round carries one gradient bucket (up to the buffer's size), and a
    bucket is at least one parameter (model/parallel/data_parallel's plan_buckets), so a rank holds
    2 × min(largest bucket, buffer) pages of its own arena (at most its gradients) and as many of
    each peer's: measured 37.8 MB at dp 2 on the 4 × 768 GPT-2 (its largest bucket, mlp.c_fc, is
    9.4 MB).
    ZeRO-1's reduce-scatter and all-gather use the same buffers; its heap holds the gathered
    buckets (model/parallel/data_parallel's ShardedAdamW.update starts them all before waiting) and
    the reduced shards, during the optimizer
    step only, when the activations and the backward's temporaries are gone (measured dp2 4 × 768:
    counting both at once over-predicted the rank by 19 %).
    Arena pages are not heap: `RankMemory.peak` adds them on top of the heap's peak.
    In place (`elements` 0, GPUs): a bucket each way.
    The pipeline keeps the messages waiting for their action (an activation and a gradient)."""
    heap = shared = step_only = 0
    if c.dp > 1 and not elements:
        heap += 2 * bucket_bytes
    if c.dp > 1 and elements:
        gradients = elements * dtype.itemsize
        round_fill = min(max(bucket_bytes, largest_parameter * dtype.itemsize), channel_buffer_bytes())
        shared += c.dp * min(2 * round_fill, gradients)  # one parity's pages hold all when they fit
        if c.zero:  # heap: every bucket's all-gathered parameters in flight at once, the reduced
            step_only = gradients + 2 * -(-gradients // c.dp)  # gradient shards and their concatenation
            heap += step_only
    if c.pp > 1:
        positions = T // c.tp if c.sequence_parallel and c.tp > 1 else T
        heap += 2 * B * positions * config.n_embd * dtype.itemsize
    return heap + shared, shared, step_only


def _workspace_bytes(inventory, c: Candidate, B, T, dtype, last: bool) -> int:
    """The largest temporaries of a backward: the GeLU backward's two (B, T, F/t) passes and the
    attention's dqkv in a block; the LM head's weight gradient and input gradient on the last stage.
    (`layout_memory` weighs them against the weight gradients of a stage's blocks: each block's come
    in a fresh dict, and the stage keeps them all until its backward-weight of the micro-batch ends,
    through the next forward where the backward is fused (the executor's `weight_work`): one more
    copy of the stage's block parameters on top of the activations, measured as a rank's "first-step
    heap growth" over its build peak: +32 MB on a 4 × 768 dp1 rank, +15 MB on a pp2 stage.)"""
    config = inventory.config
    block = B * T * (2 * config.mlp_width + 3 * config.n_embd) // c.tp
    head = (-(-config.vocab_size // c.tp) * config.n_embd + 2 * B * T * config.n_embd) if last else 0
    return max(block, head) * dtype.itemsize

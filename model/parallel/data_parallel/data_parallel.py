"""Data parallelism: gradients in flat buckets reduced while backward still runs, and ZeRO-1.

Every data-parallel replica holds the same parameters and computes gradients on its own rows of
the global batch. Parameters and gradients of a rank live in two flat buffers; `stage.params` and
`stage.grads` entries are views into them (a tied parameter held by two local stages is one view), so
nothing is copied before communicating. The buffers are cut into buckets in the order gradients
become final in backward (last layer first):

    gradients = GradientBuckets(stages, mesh.dp, mesh.tie, bucket_bytes=1 << 20, shard=False)
    ... backward of the last micro-batch: each bucket's average starts once all its grads are final
    grads = gradients.finish()          # waits; {name: averaged gradient view}
    (shard=True, ZeRO-1: finish() returns this rank's 1/dp shard of every bucket, and `ShardedAdamW`
    updates only that shard, then all-gathers the parameters.)

Micro-batches before the last accumulate locally and do not communicate (as DDP's no_sync).
A tied parameter (the plan's `tied_params`, e.g. GPT-2's wte) has a bucket of its own where a tie
group exists. With pp > 1 the first and the last stage both hold it, but only the first (its owner)
keeps its optimizer state: after the data-parallel average the last stage sends its gradient
contribution to the first (`finish`), the owner updates the weight, and `share_tied` sends it back.
The last stage so holds the weight and its gradient, never its Adam moments (15 % of a rank's state
at GPT-2 medium, tp 2 × pp 2).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ringpipe.model.nn.optim import adamw_update, decays
from ringpipe.model.parallel.data_parallel.data_parallel_communications import gather_shard, gather_shards, reduce_gradients, shard_bounds
from ringpipe.runtime.array_module import to_host

# Small enough that a baby GPT gets several buckets (overlap), large enough that per-collective
# overhead (~100 µs on the local runtime) stays small next to the bytes moved.
DEFAULT_BUCKET_BYTES = 1 << 20


@dataclass(frozen=True)
class Bucket:
    """A contiguous run [start, start + size) of the flat buffers, holding `names` (padded)."""
    start: int
    size: int
    names: tuple

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.size)


def plan_buckets(groups_in_ready_order: list, shapes: dict, itemsize: int, bucket_bytes: int,
                 pad_to: int = 1, tied=()) -> tuple[list[Bucket], dict]:
    """Pure planning: (buckets in ready order, {name: element offset in the flat buffers}).

    A name reported more than once (a tied parameter on two local stages) is final at its last report.
    A bucket closes before a parameter that would take it past `bucket_bytes` (one larger parameter
    gets a bucket alone); each `tied` name is always alone. The last group reported starts a bucket
    of its own: what is left to reduce once backward ends is that group, not a whole bucket of
    gradients that were final long before (GPT-2 128 wide, dp = 2: 774 KiB → 64 KiB).
    Bucket sizes are padded to `pad_to`.
    """
    last_seen, group_of = {}, {}
    flat = ((g, name) for g, group in enumerate(groups_in_ready_order) for name in group)
    for position, (g, name) in enumerate(flat):
        last_seen[name], group_of[name] = position, g
    order = sorted(last_seen, key=last_seen.get)
    last_group = group_of[order[-1]] if order else None
    first_of_last_group = next(name for name in order if group_of[name] == last_group) if order else None
    buckets, offsets, current, start, used = [], {}, [], 0, 0  # used: elements in `current`

    def close():
        nonlocal current, start, used
        if current:
            size = -(-used // pad_to) * pad_to
            buckets.append(Bucket(start, size, tuple(current)))
            start, current, used = start + size, [], 0

    for name in order:
        elements = int(np.prod(shapes[name]))
        if name in tied or name == first_of_last_group or (current and (used + elements) * itemsize > bucket_bytes):
            close()
        offsets[name] = start + used
        current.append(name)
        used += elements
        if name in tied:
            close()
    close()
    return buckets, offsets


class GradientBuckets:
    """Flat parameter/gradient buffers of this rank's stages, and their bucketed dp reduction.

    stages: stage index -> stage on this rank (its params/grads entries are replaced by views, its
    `on_grads_final` set); dp_comm: the data-parallel communicator; tie_comm: first + last pipeline
    stage (the mesh's tie group; None without pipeline parallelism), over which the gradients of the
    stages' `plan.tied_params` are summed on the first stage; shard: ZeRO-1 (reduce-scatter, padded buckets).
    `updates(b)`: whether this rank's optimizer updates bucket b (not a tied bucket on the last stage).
    """

    def __init__(self, stages: dict, dp_comm, tie_comm=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 shard: bool = False):
        self.dp_comm, self.tie_comm, self.shard = dp_comm, tie_comm, shard
        self.dp_size, self.dp_rank = dp_comm.size, dp_comm.rank
        some = next(iter(stages.values()))
        params = {name: p for stage in stages.values() for name, p in stage.params.items()}
        groups = [g for s in sorted(stages, reverse=True) for g in stages[s].grad_groups_in_ready_order()]
        reported = {name for group in groups for name in group}
        groups.append(sorted(set(params) - reported))  # never reported: reduced when backward ends
        dtype = next(iter(params.values())).dtype
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        # A tied parameter gets a bucket of its own only where the tie group sums it across stages;
        # without one (no pipeline) it shares a bucket like any other: one collective fewer a step.
        tied = {name for stage in stages.values() for name in stage.plan.tied_params} if tie_comm is not None else set()
        self.buckets, offsets = plan_buckets(groups, shapes, dtype.itemsize, bucket_bytes,
                                             self.dp_size if shard else 1, tied)
        self.offsets, self.shapes, self.xp = offsets, shapes, some.xp
        total = sum(b.size for b in self.buckets)
        self.flat_params = self.xp.zeros(total, dtype)
        self.flat_grads = self.xp.zeros(total, dtype)
        self.params = {name: self.view(self.flat_params, name) for name in params}
        self.grads = {name: self.view(self.flat_grads, name) for name in params}
        for name, p in params.items():
            self.params[name][...] = p
        self.reports_needed = [0] * len(self.buckets)
        self.bucket_of = {name: i for i, b in enumerate(self.buckets) for name in b.names}
        for stage in stages.values():
            for name in stage.params:
                stage.params[name], stage.grads[name] = self.params[name], self.grads[name]
                self.reports_needed[self.bucket_of[name]] += 1
            stage.on_grads_final = self.mark_final
        # A tied parameter is updated, and counts in the global norm, once: on the rank holding the first stage.
        self.tied_buckets = {self.bucket_of[name] for name in tied if name in self.bucket_of}
        self.owns_tied = tie_comm is None or any(getattr(stage, "first", False) for stage in stages.values())
        self.timings = {}
        if self.dp_size > 1:
            # Every replica is here: a barrier, the first collective the caller waits for, opens the
            # group's same-host channel (runtime/shm_channel.py). The bucket averages are
            # asynchronous, and those use the channel only once it is open; without it every one
            # went through the engine thread and ZeroMQ messages.
            dp_comm.barrier()
        self.begin_step()

    def view(self, flat, name: str):
        """Parameter `name`'s place in a flat buffer laid out like these buckets, in its shape."""
        start, shape = self.offsets[name], self.shapes[name]
        return flat[start:start + int(np.prod(shape))].reshape(shape)

    def begin_step(self):
        """Forget the previous step's readiness and zero the gradients."""
        self.missing = list(self.reports_needed)
        self.handles = {}  # bucket index -> handle (None: nothing to exchange), in launch order
        self.first_launch = None
        self.flat_grads[...] = 0

    def mark_final(self, names):
        """Stage callback: these gradients got their last contribution of the step."""
        for name in names:
            b = self.bucket_of[name]
            self.missing[b] -= 1
            if self.missing[b] == 0:
                self._launch(b)

    def _launch(self, b: int):
        if self.first_launch is None:
            self.first_launch = time.perf_counter()
        grads = self.flat_grads[self.buckets[b].span]
        # The comm span starts when the engine thread picks the operation up; this marks the launch.
        self.dp_comm.tracer.instant("bucket launch", args={"bucket": b, "bytes": int(grads.nbytes)})
        self.handles[b] = reduce_gradients(self.dp_comm, grads, self.shard) if self.dp_size > 1 else None

    def finish(self):
        """Wait for every bucket (launching those not yet started, in bucket order).

        Returns {name: averaged gradient} (views into the flat buffer), or with `shard` the list of
        this rank's averaged shards, one per bucket. Timings go to `self.timings` (seconds):
        overlapped = first launch → end of backward, exposed = waiting after backward."""
        backward_end = time.perf_counter()
        for b in range(len(self.buckets)):
            if b not in self.handles:
                self._launch(b)
        shards = [None] * len(self.buckets)
        for b, handle in self.handles.items():
            span = self.buckets[b].span
            # all-reduce averages `flat_grads` in place; reduce-scatter returns this rank's shard
            shards[b] = self.flat_grads[span] if handle is None else handle.wait()
            if b in self.tied_buckets and self.tie_comm is not None:
                self._sum_tied_on_owner(shards[b])
        done = time.perf_counter()
        self.timings = {"buckets": len(self.buckets), "overlapped_s": backward_end - self.first_launch,
                        "exposed_s": done - backward_end, "reduce_s": done - self.first_launch}
        return shards if self.shard else self.grads

    def updates(self, b: int) -> bool:
        return self.owns_tied or b not in self.tied_buckets

    def _sum_tied_on_owner(self, grad):
        # The tie group is [first stage, last stage]: group rank 0 owns. a + b is commutative, so the
        # owner's sum has the bits an all-reduce would give.
        if self.owns_tied:
            grad += self.tie_comm.recv(1)
        else:
            self.tie_comm.send(grad, 0)

    def share_tied(self, flat) -> None:
        """The owner's updated tied weights into the last stage's copy; `flat` is laid out like these
        buckets (the weights, or a mixed run's float32 master weights). Both stages call it."""
        for b in sorted(self.tied_buckets):
            self.share_tied_bucket(b, flat, self.buckets[b].span)

    def share_tied_bucket(self, b: int, flat, span: slice | None = None) -> None:
        """`share_tied` for bucket b's `span` of `flat` (default: this rank's 1/dp of it, as ZeRO-1
        updates it before the all-gather over dp)."""
        if self.tie_comm is not None:
            self.tie_comm.broadcast(flat[self.shard_of(b) if span is None else span], src=0)

    def shard_sum_of_squares(self, shards: list, skip=()) -> float:
        """Σ g² over this rank's shards (tied parameters only where they are counted), leaving out the
        `skip` ranges ((bucket, start, stop) from `shard_ranges`)."""
        skipped = {}
        for b, start, stop in skip:
            skipped.setdefault(b, []).append((start, stop))
        total = 0.0
        for b, shard in enumerate(shards):
            if not self.updates(b):
                continue
            host, position = to_host(shard), 0
            for start, stop in sorted(skipped.get(b, [])) + [(len(host), len(host))]:
                piece = host[position:start]
                total += float(np.vdot(piece, piece))
                position = stop
        return total

    def shard_ranges(self, names) -> list:
        """[(bucket, start, stop)]: where the named parameters' elements lie inside this rank's
        shards (indices into `finish()`'s shard arrays), in name order. Every rank with the same
        stages and dp rank gets the same list, so tensor-parallel peers can reduce these pieces."""
        ranges = []
        for name in sorted(names):
            b, shard = self.bucket_of[name], self.shard_of(self.bucket_of[name])
            begin = self.offsets[name]
            lo, hi = max(begin, shard.start), min(begin + math.prod(self.shapes[name]), shard.stop)
            if lo < hi:
                ranges.append((b, lo - shard.start, hi - shard.start))
        return ranges

    def shard_of(self, b: int) -> slice:
        """This rank's part of bucket b, as a slice of the flat buffers."""
        bucket = self.buckets[b]
        local = shard_bounds(bucket.size, self.dp_rank, self.dp_size)
        return slice(bucket.start + local.start, bucket.start + local.stop)


class ShardedAdamW:
    """ZeRO-1 AdamW: moments only for this rank's 1/dp shard of every bucket it updates (a tied
    bucket on the last stage gets its shard from the first stage instead, see `GradientBuckets`).

    `update(shards, lr, grad_scale)` applies AdamW to the shard, then all-gathers the parameters.
    `state_dict()` / `load_state_dict()` use the full per-parameter format of `AdamW` (gathered over
    dp, so every rank must call them) for the parameters this rank updates, so a checkpoint resumes
    with any dp size or layout.
    """

    def __init__(self, gradients: GradientBuckets, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.gradients, self.beta1, self.beta2, self.eps = gradients, betas[0], betas[1], eps
        self.xp, flat = gradients.xp, gradients.flat_params
        self.shards = [gradients.shard_of(b) for b in range(len(gradients.buckets))]
        # No moments (nor rates) for a bucket another stage updates: empty arrays keep the indices.
        kept = [s.stop - s.start if gradients.updates(b) else 0 for b, s in enumerate(self.shards)]
        self.m = [self.xp.zeros(n, flat.dtype) for n in kept]
        self.v = [self.xp.zeros_like(m) for m in self.m]
        rates = self.xp.zeros_like(flat)
        for name, p in gradients.params.items():
            if decays(p):
                gradients.view(rates, name)[...] = weight_decay
        # per-element rates: 0 on biases and gains
        self.decay = [rates[s].copy() if n else rates[:0].copy() for s, n in zip(self.shards, kept)]
        self.step_count = 0

    @property
    def moment_bytes(self) -> int:
        """Bytes of optimizer moments held by this rank."""
        return int(sum(m.nbytes + v.nbytes for m, v in zip(self.m, self.v)))

    def update(self, grad_shards: list, lr: float, grad_scale: float = 1.0) -> None:
        self.step_count += 1
        flat, gathering = self.gradients.flat_params, []
        for b, shard in enumerate(self.shards):
            if self.gradients.updates(b):
                grad = grad_shards[b]  # this step's own array (or a view of the flat gradients): scaled in place
                if grad_scale != 1.0:
                    grad *= grad_scale
                adamw_update(flat[shard], grad, self.m[b], self.v[b], self.step_count, lr, self.beta1,
                             self.beta2, self.eps, self.decay[b])
            if b in self.gradients.tied_buckets:  # the owner's shard of the tied weights to the last stage
                self.gradients.share_tied_bucket(b, flat)
            if self.gradients.dp_size > 1:  # gather this bucket while the next one is updated
                gathering.append(gather_shard(self.gradients.dp_comm, flat[shard]))
        for bucket, handle in zip(self.gradients.buckets, gathering):
            flat[bucket.span] = handle.wait()

    def _gathered(self, moments: list) -> list:
        if self.gradients.dp_size == 1:
            return moments
        return gather_shards(self.gradients.dp_comm, moments)

    def _updated_names(self) -> list[str]:
        return [name for name in self.gradients.params if self.gradients.updates(self.gradients.bucket_of[name])]

    def state_dict(self) -> dict:
        """Host arrays "step", "m.NAME", "v.NAME" for every parameter this rank updates (collective over dp)."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for moment, shards in (("m", self.m), ("v", self.v)):
            flat = self.xp.zeros_like(self.gradients.flat_params)
            for b, full in enumerate(self._gathered(shards)):
                if self.gradients.updates(b):
                    flat[self.gradients.buckets[b].span] = full
            for name in self._updated_names():
                state[f"{moment}.{name}"] = to_host(self.gradients.view(flat, name)).copy()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's shard of full per-parameter moments (ValueError on missing or misshapen)."""
        for moment, shards in (("m", self.m), ("v", self.v)):
            flat = self.xp.zeros_like(self.gradients.flat_params)
            for name in self._updated_names():
                param, key = self.gradients.params[name], f"{moment}.{name}"
                if key not in state:
                    raise ValueError(f"ZeRO-1 (dp rank {self.gradients.dp_rank}): optimizer state lacks {key!r}")
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ValueError(f"ZeRO-1 (dp rank {self.gradients.dp_rank}): optimizer state {key!r} has "
                                     f"shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(param.shape)}")
                self.gradients.view(flat, name)[...] = self.xp.asarray(state[key])
            for b, shard in enumerate(self.shards):
                shards[b][...] = flat[shard]
        self.step_count = int(state["step"])

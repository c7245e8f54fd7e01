"""One rank's part of the model in a parallel layout: a contiguous range of layers, plus the
embedding on the first pipeline stage and the head and loss on the last, with or without tensor
parallelism (the regions are the only difference: identities when tp = 1).

Every parallel schedule talks to a stage through the same four calls:

    output, cache = stage.forward(inputs, targets, dropout_seed)
        first stage: inputs = token ids (B, T); otherwise hidden states (B, T, C)
        last stage:  output = the micro-batch's mean loss (float); otherwise hidden states
    dinputs, deferred = stage.backward_input(cache, doutput, last=False)
        last stage: doutput = d(total loss)/d(this micro-batch's loss), a float
        first stage: dinputs = None
    stage.backward_weight(deferred, last=False)  # weight gradients; may run later (zero-bubble W)
    stage.grads                         # accumulated gradients, keyed like stage.params

Gradient readiness (for data-parallel buckets): the executor passes `last=True` to the stage's last
backward_input and last backward_weight of the step. During those calls, as soon as a group of
gradients has received its final contribution, the stage calls `stage.on_grads_final(names)` (when
set). `stage.grad_groups_in_ready_order()` lists those groups in the order they are reported. A tied
parameter is reported once per stage, after the stage's last contribution to it.

What the layers are, which parameters they use and how those are sharded comes from the model
family's parallel plan (model/parallel/plan.py); this file names no weight.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.nn.activation_memory import ActivationMemory
from ringpipe.model.parallel.plan import REPLICATED, ParallelPlan, stage_param_names
from ringpipe.model.parallel.tensor_parallel.sharding import shard, shard_shape, shard_table
from ringpipe.model.parallel.tensor_parallel.tensor_parallel_communications import (IDENTITY, input_region, output_region,
                                                                           sequence_slice)
from ringpipe.runtime.array_module import array_module, to_host


class Stage:
    """Layers `layers` (and embedding/head when first/last) of the model `plan` describes, this rank's
    shards of their parameters, and accumulated gradients. `tp_comm`: the tensor-parallel communicator
    (mesh.tp); None or a group of one for a stage without tensor parallelism. `full_params`: {name: full
    array}, or {name: full shape tuple} for parameters that start as zeros of this rank's shard shapes,
    to be filled by the caller (inference reads only its shards of a checkpoint into them).

    shard_axes        name -> axis the parameter is split along across tp (None: replicated)
    replicated_names  parameters whose gradients are the same on every tp rank (after finalize_grads)
    tp_partial_names  with sequence parallelism, the plan's sequence-partial parameters: each rank's
                      gradient covers only its positions and must be summed over tp
    finalize_grads()  that sum, on this stage's gradients (ZeRO-1 does it on its shards instead)
    """

    def __init__(self, plan: ParallelPlan, full_params: dict, layers: range, first: bool, last: bool, tp_comm=None,
                 sequence_parallel: bool = False):
        self.plan, self.layers, self.first, self.last = plan, layers, first, last
        self.tp = tp_comm
        size, rank = (1, 0) if tp_comm is None else (tp_comm.size, tp_comm.rank)
        self.tensor_parallel = size > 1
        self.sequence_parallel = sequence_parallel and self.tensor_parallel
        if self.tensor_parallel:
            plan.check_tensor_parallel(size, rank, self.sequence_parallel)
        self.tp_size, self.tp_rank = size, rank
        names = stage_param_names(plan, layers, first, last)
        # Nothing is split without tensor parallelism.
        self.shardings = {name: plan.sharding(name) if self.tensor_parallel else REPLICATED for name in names}
        self.shard_axes = {name: s.axis for name, s in self.shardings.items()}
        self.full_shapes = {name: full_params[name] if isinstance(full_params[name], tuple)
                            else tuple(full_params[name].shape) for name in names}
        self.xp = array_module(plan.device)
        dtype = np.dtype(plan.dtype)
        self.params = {name: self.xp.zeros(shard_shape(full_params[name], self.shardings[name], size), dtype)
                       if isinstance(full_params[name], tuple) else
                       self.xp.asarray(np.array(self.take_shard(name, full_params[name]), dtype=dtype))
                       for name in names}
        self.grads = {name: self.xp.zeros_like(p) for name, p in self.params.items()}
        self.replicated_names = [name for name, axis in self.shard_axes.items() if axis is None]
        self.tp_partial_names = [name for name, s in self.shardings.items()
                                 if self.sequence_parallel and s.sequence_partial]
        self.memory = ActivationMemory()
        if self.tensor_parallel:
            self.input_region, self.output_region = input_region(self.sequence_parallel), output_region(
                self.sequence_parallel)
        else:
            self.input_region = self.output_region = IDENTITY
        self.pieces = plan.stage_pieces(self)
        self.on_grads_final = None  # callback(names) for data-parallel buckets; see the module docstring

    # ---- parameters and gradients -----------------------------------------------------------------------
    def take_shard(self, name: str, full_array):
        """This rank's part of a full parameter-shaped array (a checkpoint's weight or AdamW moment)."""
        return shard(to_host(full_array), self.shardings[name], self.tp_rank, self.tp_size)

    def shard_table(self) -> dict:
        """{name: {"axis", "parts", "tp_rank", "tp_size", "full_shape"}} of this stage's parameters."""
        return shard_table(self.shardings, self.full_shapes, self.tp_rank, self.tp_size)

    def positions(self, length: int) -> slice:
        """The sequence positions of a length-`length` sequence this rank's activations hold."""
        return sequence_slice(length, self.tp) if self.sequence_parallel else slice(0, length)

    def zero_grads(self):
        for g in self.grads.values():
            g[...] = 0

    def finalize_grads(self):
        """With sequence parallelism, sum the sequence-partial gradients over tp (one all-reduce)."""
        if not self.tp_partial_names:
            return
        flat = self.xp.concatenate([self.grads[name].ravel() for name in self.tp_partial_names])
        self.tp.all_reduce(flat)
        offset = 0
        for name in self.tp_partial_names:
            g = self.grads[name]
            g[...] = flat[offset:offset + g.size].reshape(g.shape)
            offset += g.size

    # ---- gradient readiness ---------------------------------------------------------------------------
    def grad_groups_in_ready_order(self) -> list[list[str]]:
        """Parameter names in the groups that `on_grads_final` reports, in the order it reports them
        on the step's last micro-batch: head and embedding during backward_input, then the blocks
        (last first) during backward_weight. This is also the order of the data-parallel flat
        buffers, whose last group has a bucket of its own (data_parallel.plan_buckets)."""
        groups = [self._head_names()] if self.last else []
        blocks = [group for i in reversed(self.layers) for group in self._block_groups(i)]
        embedding = [self._tied_last(self.plan.embedding_params())] if self.first else []
        return groups + embedding + blocks

    def _block_groups(self, i) -> list[list[str]]:
        """Block i's parameters in the groups `backward_weight` reports them on the step's last
        micro-batch: a linear at a time where the pieces compute them so (their
        `block_weight_parts_names`), so that the last bucket holds only the last linear."""
        names = list(self.plan.block_params(i))
        parts = getattr(self.pieces, "block_weight_parts_names", None)
        if parts is None or getattr(self.pieces, "block_backward_weight_parts", None) is None:
            return [names]
        known = set(names)
        groups = [[name for name in group if name in known] for group in parts(i)]
        listed = {name for group in groups for name in group}
        rest = [name for name in names if name not in listed]  # (reported last by backward_weight)
        return [group for group in groups + [rest] if group]

    def _tied_last(self, names) -> list[str]:
        tied = set(self.plan.tied_params)
        return [n for n in names if n not in tied] + [n for n in names if n in tied]

    def _head_names(self) -> list[str]:
        # On a stage that also embeds, a tied parameter gets its last contribution from the embedding backward.
        tied = set(self.plan.tied_params)
        return self._tied_last([n for n in self.plan.head_params() if not (self.first and n in tied)])

    def _report_final(self, names: list[str], last: bool):
        if last and self.on_grads_final is not None:
            self.on_grads_final(names)

    def _accumulate(self, grads: dict):
        for name, g in grads.items():
            self.grads[name] += g

    # ---- the stage interface ----------------------------------------------------------------------------
    def forward(self, inputs, targets=None, dropout_seed=None):
        caches, x = [], inputs
        if self.first:
            x, cache = self.pieces.embedding_forward(inputs, dropout_seed)
            caches.append(("embedding", cache))
        for i in self.layers:
            x, cache = self.pieces.block_forward(i, x, dropout_seed)
            caches.append((i, cache))
        if self.last:
            loss, cache = self.pieces.head_forward(x, targets)
            caches.append(("head", cache))
            return loss, caches
        return x, caches

    def forward_only(self, inputs, targets=None):
        """`forward` for evaluation: the same output (the last stage's mean loss, else hidden
        states), each piece's cache dropped as soon as the next piece has its input, so a forward-only
        pass holds one piece's activations at a time and none after it (no dropout)."""
        x = inputs
        if self.first:
            x, cache = self.pieces.embedding_forward(inputs, None)
            self.memory.release(cache)
        for i in self.layers:
            x, cache = self.pieces.block_forward(i, x, None)
            self.memory.release(cache)
        if self.last:
            loss, cache = self.pieces.head_forward(x, targets)
            self.memory.release(cache)
            return loss
        return x

    def backward_input(self, caches, doutput, last: bool = False):
        deferred, dx = [], doutput
        while caches:
            kind, cache = caches.pop()
            if kind == "head":
                dx, grads = self.pieces.head_backward(cache, doutput)
                self._accumulate(grads)
                self._report_final(self._head_names(), last)
            elif kind == "embedding":
                self._accumulate(self.pieces.embedding_backward(cache, dx))
                dx = None
                self._report_final(self._tied_last(self.plan.embedding_params()), last)
            else:
                dx, block_deferred = self.pieces.block_backward_input(kind, cache, dx)
                deferred.append(block_deferred)
        return dx, deferred

    def backward_weight(self, deferred, last: bool = False):
        in_parts = getattr(self.pieces, "block_backward_weight_parts", None)
        for block_deferred in deferred:
            if not (last and in_parts and self.on_grads_final):
                self._accumulate(self.pieces.block_backward_weight(block_deferred))
                self._report_final(self.plan.block_params(block_deferred.layer), last)
                continue
            # The step's last weight backward: report each linear's gradients as they are final.
            left = list(self.plan.block_params(block_deferred.layer))
            for grads in in_parts(block_deferred):
                self._accumulate(grads)
                final = [name for name in grads if name in left]
                left = [name for name in left if name not in grads]
                if final:
                    self._report_final(final, last)
            if left:
                self._report_final(left, last)

    def logits(self, idx):
        """Inference on a stage holding the whole model: idx int (B, T) -> full logits (B, T, vocab),
        gathered over tensor-parallel ranks (for checks and sampling; training never gathers them)."""
        x, cache = self.pieces.embedding_forward(idx, None)
        self.memory.release(cache)
        for i in self.layers:
            x, cache = self.pieces.block_forward(i, x, None)
            self.memory.release(cache)
        return self.pieces.head_logits(x)

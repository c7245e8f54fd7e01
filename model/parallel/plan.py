"""The parallel plan: what a model family tells model/parallel, which names no weight of any family.

A family (GPT-2: model/gpt2/parallel_plan.py) describes itself to the parallel machinery by an
object with these members; the mesh, the one `Stage` class, data parallelism and the trainer ask
it, and nothing else, about names, shards, ties and the forward/backward of a stage.

    plan.dtype, plan.device              how the weights are held ("float64", "cpu", ...)
    plan.num_layers                      the blocks pipeline stages divide between them
    plan.init_params(seed)               {name: full float64 host array}, the same whatever the layout
    plan.init_params_of(seed, names, dtype)  (optional) the same values for `names` only, cast to
                                         `dtype`, without holding the rest: a rank then never holds
                                         the whole model, even while it starts
    plan.param_shapes()                  (optional) {name: full shape}, without making any array: the
                                         default pipeline split then balances parameter bytes
    plan.embedding_params()              names the first pipeline stage holds besides its blocks
    plan.block_params(i)                 names of block i
    plan.head_params()                   names the last pipeline stage holds besides its blocks
    plan.hf_name(name)                   the name's Hugging Face name (sharded checkpoints store it so)
    plan.tied_params                     names held by both the first and the last stage (a tied
                                         embedding/LM head): the first stage sums their gradients over
                                         the mesh's tie group, counts them in the gradient norm, keeps
                                         their AdamW moments and sends the updated weights to the last
    plan.sharding(name)                  a `Sharding`: replicated, column-, row- or vocab-parallel
                                         (axis, fused parts, sequence-partial gradient)
    plan.check_tensor_parallel(size, rank, sequence_parallel)
                                         ValueError naming the size that cannot split the model
    plan.stage_pieces(stage)             the `StagePieces` of one `Stage`, bound to its params and regions

`StagePieces` are the forward/backward op pairs a stage strings together (embedding on the first
stage, blocks, head and loss on the last). They use `stage.params`, `stage.memory`, `stage.tp`,
`stage.input_region` / `stage.output_region` (identities when tp = 1), `stage.sequence_parallel`
and `stage.positions(length)`; gradients are returned as {name: array} and the stage accumulates them.

    embedding_forward(idx, dropout_seed) -> (x, cache)     idx int (B, T); x (B, T or T/tp, C)
    embedding_backward(cache, dx) -> grads
    block_forward(i, x, dropout_seed) -> (x, cache)
    block_backward_input(i, cache, dout) -> (dx, deferred)  deferred.layer == i
    block_backward_weight(deferred) -> grads
    head_forward(x, targets) -> (loss float, cache)          the micro-batch's mean loss
    head_backward(cache, dloss) -> (dx, grads)
    head_logits(x) -> logits (B, T, vocab)                   inference only (gathered over tp)

Pieces may also have `block_backward_weight_parts(deferred)`: the same gradients as dicts, a
linear at a time, so the stage reports each as soon as it is final (data-parallel buckets start then).

Pieces that can generate with a KV cache (model/inference/kv_cache.py; GPT-2's) also have
    embedding_at(idx, start) -> x                            positions start .. start + T, no dropout
    block_forward_cached(i, x, (keys, values), start) -> x   this rank's heads' keys and values cached
"""
from __future__ import annotations

import math
from typing import Protocol

from ringpipe.model.parallel.tensor_parallel.sharding import (REPLICATED, Sharding, column_parallel,  # noqa: F401
                                                     row_parallel, vocab_parallel)


class StagePieces(Protocol):
    def embedding_forward(self, idx, dropout_seed): ...
    def embedding_backward(self, cache, dx) -> dict: ...
    def block_forward(self, i: int, x, dropout_seed): ...
    def block_backward_input(self, i: int, cache, dout): ...
    def block_backward_weight(self, deferred) -> dict: ...
    def head_forward(self, x, targets): ...
    def head_backward(self, cache, dloss): ...
    def head_logits(self, x): ...


class ParallelPlan(Protocol):
    dtype: str
    device: str
    num_layers: int
    tied_params: tuple

    def init_params(self, seed: int) -> dict: ...
    def embedding_params(self) -> list: ...
    def block_params(self, i: int) -> list: ...
    def head_params(self) -> list: ...
    def hf_name(self, name: str) -> str: ...
    def sharding(self, name: str) -> Sharding: ...
    def check_tensor_parallel(self, size: int, rank: int, sequence_parallel: bool) -> None: ...
    def stage_pieces(self, stage) -> StagePieces: ...


def stage_param_names(plan: ParallelPlan, layers: range, first: bool, last: bool) -> list[str]:
    """Names a pipeline stage holds: the embedding's on the first, its blocks', the head's on the
    last (a tied name held by a stage that is both first and last appears once)."""
    names = list(plan.embedding_params()) if first else []
    for i in layers:
        names += plan.block_params(i)
    if last:
        names += [name for name in plan.head_params() if name not in names]
    return names


def stage_sizes(plan: ParallelPlan) -> dict:
    """`split_layers`' size arguments for `plan`, so that the default pipeline split balances what
    stages keep per parameter — its weight and AdamW's two moments, the embedding and the head
    included — not block counts: {"layer_sizes": per block, "first_size": of the embedding,
    "last_size": of the head}, in elements × 3, where a tied parameter counts once on the last stage
    (its moments live on the first stage; model/parallel/data_parallel). {} for a plan without
    `param_shapes()` ({name: full shape}): its blocks are then balanced by count."""
    if not hasattr(plan, "param_shapes"):
        return {}
    shapes, tied = plan.param_shapes(), set(plan.tied_params)

    def elements(names):
        return sum(math.prod(shapes[name]) for name in names)

    head = plan.head_params()
    return {"layer_sizes": [3 * elements(plan.block_params(i)) for i in range(plan.num_layers)],
            "first_size": 3 * elements(plan.embedding_params()),
            "last_size": 3 * elements([n for n in head if n not in tied]) + elements([n for n in head if n in tied])}

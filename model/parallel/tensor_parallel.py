"""Megatron-style tensor parallelism for one pipeline stage: `TensorParallelStage`.

Each rank of the tensor-parallel group holds a slice of every weight matrix and of the vocabulary:

    attention c_attn   column-parallel by heads: n_head/tp heads, their q, k and v columns
    attention c_proj   row-parallel (rows of this rank's heads); bias replicated, added after the reduce
    mlp c_fc           column-parallel;  mlp c_proj row-parallel
    wte                vocab-parallel rows (vocabulary padded to a multiple of tp with zero rows); the
                       LM head is tied to it, and the cross-entropy runs on the sharded logits
    LayerNorms, wpe    replicated

Every sublayer is input region → column-parallel → local op → row-parallel → output region
(see tensor_parallel_communications.py): one all-reduce forward and one backward, or with sequence
parallelism an all-gather and a reduce-scatter each way, LayerNorm/dropout/residual then running on
(B, T/tp, C) sequence shards. The block itself is the dense model's (model/block.py), given these
regions and this rank's heads. Dropout masks are drawn for the full tensor and sliced, so training
is the same as the dense model's whatever tp is.
"""
from __future__ import annotations

import numpy as np

from model import ops
from model.activation_memory import ActivationMemory
from model.block import ATTN_PROBS, EMBEDDING, TransformerBlocks, dropout_generator_seed
from model.gpt import GPTConfig, param_shapes
from model.parallel.stage import _accumulate, stage_param_names
from model.parallel.tensor_parallel_communications import input_region, output_region, sequence_slice
from runtime.array_module import array_module, module_of, to_host

# Block parameter → (axis split across tp, parts): c_attn's columns are [q | k | v], each split by heads.
_BLOCK_SHARDS = {"attn.c_attn.weight": (1, 3), "attn.c_attn.bias": (0, 3), "attn.c_proj.weight": (0, 1),
                 "mlp.c_fc.weight": (1, 1), "mlp.c_fc.bias": (0, 1), "mlp.c_proj.weight": (0, 1)}


def shard_rule(name: str) -> tuple:
    """(axis, parts) of a GPT-2 parameter: split along `axis` (None: replicated), each of `parts`
    equal groups of that axis split across the tensor-parallel ranks."""
    if name == "wte.weight":
        return 0, 1
    if name.startswith("h."):
        return _BLOCK_SHARDS.get(name.split(".", 2)[2], (None, 1))
    return None, 1


def shard(full, name: str, rank: int, size: int):
    """This rank's slice of the full parameter `name`; the axis is zero-padded to a multiple of size."""
    axis, parts = shard_rule(name)
    if axis is None:
        return full
    length = full.shape[axis]
    padded = -(-length // (size * parts)) * size * parts
    if padded != length:
        widths = [(0, 0)] * full.ndim
        widths[axis] = (0, padded - length)
        full = np.pad(full, widths)
    groups = np.split(full, parts, axis=axis)
    return np.concatenate([np.split(group, size, axis=axis)[rank] for group in groups], axis=axis)


def param_layout(shard_axes: dict, rank: int, size: int, config: GPTConfig) -> dict:
    """{name: {"axis", "parts", "tp_rank", "tp_size", "full_shape"}} for a stage's `shard_axes`:
    enough to reassemble the full parameters from the shards."""
    shapes = param_shapes(config)
    return {name: {"axis": axis, "parts": shard_rule(name)[1] if axis is not None else 1, "tp_rank": rank,
                   "tp_size": size, "full_shape": list(shapes[name])} for name, axis in shard_axes.items()}


def assemble_full_params(per_rank_params: list, per_rank_layouts: list) -> dict:
    """Driver side: the full GPT-2 parameters from every rank's `local_params()` and `param_layout()`.
    Replicas of the same piece (data-parallel, replicated params) must agree bitwise."""
    pieces = {}  # name -> {tp_rank: array}
    layouts = {}
    for params, layout in zip(per_rank_params, per_rank_layouts):
        for name, value in params.items():
            entry = layout[name]
            seen = pieces.setdefault(name, {})
            if entry["tp_rank"] in seen:
                np.testing.assert_array_equal(seen[entry["tp_rank"]], value, err_msg=f"replicas of {name}")
            seen[entry["tp_rank"]] = np.asarray(value)
            layouts[name] = entry
    full = {}
    for name, by_rank in pieces.items():
        entry = layouts[name]
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


def assemble_full_optimizer_state(per_rank_states: list, per_rank_layouts: list) -> dict:
    """Driver side: the full AdamW state ("step", "m.NAME", "v.NAME") from every rank's
    `optimizer_state()` and `param_layout()` (the moments are sharded like their parameters)."""
    # "step" and anything else whole on every rank (a mixed run's loss-scaler state)
    full = {key: value for key, value in per_rank_states[0].items() if not key.startswith(("m.", "v."))}
    for moment in ("m", "v"):
        prefix = moment + "."
        parts = [{name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
                 for state in per_rank_states]
        full.update({prefix + name: value for name, value in assemble_full_params(parts, per_rank_layouts).items()})
    return full


# ---- vocab-parallel op pairs ----------------------------------------------------------------------------
def vocab_parallel_embedding_forward(weight, idx, vocab_start):
    """weight (V/tp, C) rows [vocab_start, +V/tp), idx int (B, T) -> partial (B, T, C): the rows of
    ids this rank holds, zeros elsewhere (summing over tp gives the lookup); cache (local ids, mask)."""
    xp = module_of(weight)
    local = idx - vocab_start
    mine = (local >= 0) & (local < weight.shape[0])
    local = xp.where(mine, local, 0)
    out = weight[local]
    out *= mine[..., None]
    return out, (local, mine)


def vocab_parallel_embedding_backward(dout, cache, rows):
    """dout (B, T, C) (the whole gradient) -> dweight (rows, C) of this rank's slice."""
    local, mine = cache
    return ops.embedding_backward(dout * mine[..., None], local, rows)


def vocab_parallel_cross_entropy_forward(logits, targets, vocab_start, vocab_size, comm, ignore_index=-1):
    """Mean cross-entropy from sharded logits, without gathering them.

    logits (B, T, V/tp): columns [vocab_start, +V/tp) of the full logits (overwritten with the softmax;
    float16 logits: a float32 copy is, and the cache's probs are float32);
    columns ≥ vocab_size are padding and get probability 0. targets int (B, T), full ids.
    Two all-reduces over `comm`: the row max, then (sum of exponentials, target logit) together.
    -> (loss float, cache (probs, local targets, mask of targets on this rank, valid mask, count)).
    """
    if ops.is_low_precision(logits):  # statistics and probs in float32, as ops.cross_entropy_forward
        logits = logits.astype(np.float32)
    xp = module_of(logits)
    rows = logits.shape[-1]
    flat = logits.reshape(-1, rows)
    if vocab_start + rows > vocab_size:
        flat[:, max(vocab_size - vocab_start, 0):] = -xp.inf
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    count = int(valid.sum())
    local = flat_targets - vocab_start
    mine = valid & (local >= 0) & (local < rows)
    local = xp.where(mine, local, 0)
    row_max = xp.ascontiguousarray(flat.max(-1))
    comm.all_reduce(row_max, op="max")
    flat -= row_max[:, None]
    stats = xp.empty((flat.shape[0], 2), dtype=flat.dtype)  # sum of exp, shifted target logit
    stats[:, 1] = xp.where(mine, flat[xp.arange(flat.shape[0]), local], 0.0)
    xp.exp(flat, out=flat)
    stats[:, 0] = flat.sum(-1)
    comm.all_reduce(stats)
    flat /= stats[:, :1]
    nll = xp.log(stats[:, 0]) - stats[:, 1]
    loss = float((nll * valid).sum()) / max(count, 1)
    return loss, (logits, local, mine, valid, count)


def vocab_parallel_cross_entropy_backward(cache, dloss=1.0):
    """-> dlogits (B, T, V/tp) = (probs - onehot) · valid · dloss / count, over the cached probs."""
    probs, local, mine, valid, count = cache
    xp = module_of(probs)
    flat = probs.reshape(-1, probs.shape[-1])
    flat[xp.arange(flat.shape[0]), local] -= mine.astype(probs.dtype)
    flat *= (valid * (dloss / max(count, 1))).astype(probs.dtype)[:, None]
    return probs


class _SliceOfFullDraw:
    """A generator that hands out a slice of the draw the dense model makes for the full tensor,
    so that dropout masks of shards are exactly the dense masks' slices."""

    def __init__(self, rng, full_shape, index):
        self.rng, self.full_shape, self.index = rng, full_shape, index

    def random(self, shape, dtype):
        return self.rng.random(self.full_shape, dtype=dtype)[self.index]


class TensorParallelStage(TransformerBlocks):
    """This tensor-parallel rank's part of layers `layers` (and embedding/head when first/last), with
    DenseStage's interface (see stage.py). `tp_comm` is the tensor-parallel communicator (mesh.tp).

    shard_axes        name -> axis the parameter is split along across tp (None: replicated)
    replicated_names  parameters whose gradients are the same on every tp rank (after finalize_grads)
    tp_partial_names  with sequence parallelism, the LayerNorm and wpe parameters: each rank's
                      gradient covers only its positions and must be summed over tp
    finalize_grads()  that sum, on this stage's gradients (ZeRO-1 does it on its shards instead)
    """

    recompute_one_half_at_a_time = False  # recomputing attention twice would repeat its collectives

    def __init__(self, config: GPTConfig, full_params: dict, layers: range, first: bool, last: bool, tp_comm,
                 sequence_parallel: bool = False):
        self.config, self.layers, self.first, self.last = config, layers, first, last
        self.tp, self.sequence_parallel = tp_comm, sequence_parallel
        size, rank = tp_comm.size, tp_comm.rank
        if config.n_head % size:
            raise ValueError(f"tensor parallel: n_head {config.n_head} is not divisible by tp {size} (rank {rank})")
        if config.mlp_width % size:
            raise ValueError(f"tensor parallel: the MLP width {config.mlp_width} (n_inner) is not divisible by tp "
                             f"{size} (rank {rank})")
        if sequence_parallel and config.block_size % size:
            raise ValueError(f"sequence parallel: block_size {config.block_size} is not divisible by tp {size}")
        self.local_heads = config.n_head // size
        self.heads = slice(rank * self.local_heads, (rank + 1) * self.local_heads)
        self.vocab_rows = -(-config.vocab_size // size)  # per rank, after padding to a multiple of tp
        self.vocab_start = rank * self.vocab_rows
        self.xp = array_module(config.device)
        dtype = np.dtype(config.dtype)
        names = stage_param_names(config, layers, first, last)
        self.shard_axes = {name: shard_rule(name)[0] for name in names}
        self.params = {name: self.xp.asarray(np.array(shard(to_host(full_params[name]), name, rank, size),
                                                      dtype=dtype)) for name in names}
        self.grads = {name: self.xp.zeros_like(p) for name, p in self.params.items()}
        self.replicated_names = [name for name, axis in self.shard_axes.items() if axis is None]
        self.tp_partial_names = [name for name in names if sequence_parallel and size > 1 and
                                        (".ln_" in name or name.startswith("ln_f") or name == "wpe.weight")]
        self.memory = ActivationMemory()
        self.input_region, self.output_region = input_region(sequence_parallel), output_region(sequence_parallel)
        self.on_grads_final = None  # callback(names) for data-parallel buckets, as on DenseStage

    def grad_groups_in_ready_order(self) -> list[list[str]]:
        """Parameter names in the groups, and the order, that `on_grads_final` reports them."""
        groups = [self._head_names()] if self.last else []
        groups += [self._block_names(i) for i in reversed(self.layers)]
        return groups + ([["wpe.weight", "wte.weight"]] if self.first else [])

    def _head_names(self):
        return ["ln_f.weight", "ln_f.bias"] + ([] if self.first else ["wte.weight"])

    def _block_names(self, i):
        return [name for name in self.params if name.startswith(f"h.{i}.")]

    def _report_final(self, names, last):
        if last and self.on_grads_final is not None:
            self.on_grads_final(names)

    def take_shard(self, name: str, full_array):
        """This rank's part of a full parameter-shaped array (a checkpoint's weight or AdamW moment)."""
        return shard(to_host(full_array), name, self.tp.rank, self.tp.size)

    def zero_grads(self):
        for g in self.grads.values():
            g[...] = 0

    def finalize_grads(self):
        if not self.tp_partial_names:
            return
        xp = self.xp  # one all-reduce for all of them
        flat = xp.concatenate([self.grads[name].ravel() for name in self.tp_partial_names])
        self.tp.all_reduce(flat)
        offset = 0
        for name in self.tp_partial_names:
            g = self.grads[name]
            g[...] = flat[offset:offset + g.size].reshape(g.shape)
            offset += g.size

    # ---- the stage interface ----------------------------------------------------------------------------
    def forward(self, inputs, targets=None, dropout_seed=None):
        caches, x = [], inputs
        if self.first:
            x, cache = self._embedding_forward(inputs, dropout_seed)
            caches.append(("embedding", cache))
        for i in self.layers:
            x, cache = self.block_forward(i, x, dropout_seed)
            caches.append((i, cache))
        if self.last:
            loss, cache = self._head_forward(x, targets)
            caches.append(("head", cache))
            return loss, caches
        return x, caches

    def backward_input(self, caches, doutput, last: bool = False):
        deferred, dx = [], doutput
        while caches:
            kind, cache = caches.pop()
            if kind == "head":
                dx = self._head_backward(cache, doutput)
                self._report_final(self._head_names(), last)
            elif kind == "embedding":
                self._embedding_backward(cache, dx)
                dx = None
                self._report_final(["wpe.weight", "wte.weight"], last)
            else:
                dx, block_deferred = self.block_backward_input(kind, cache, dx)
                deferred.append(block_deferred)
        return dx, deferred

    def backward_weight(self, deferred, last: bool = False):
        for block in deferred:
            _accumulate(self.grads, self.block_backward_weight(block))
            self._report_final(self._block_names(block.layer), last)

    def logits(self, idx):
        """Inference on a stage holding the whole model: idx int (B, T) -> full logits (B, T, vocab_size),
        the vocabulary shards gathered (for checks and sampling; training never gathers them)."""
        x, cache = self._embedding_forward(idx, None)
        self.memory.release(cache)
        for i in self.layers:
            x, cache = self.block_forward(i, x, None)
            self.memory.release(cache)
        a, _ = ops.layernorm_forward(x, self.params["ln_f.weight"], self.params["ln_f.bias"],
                                     self.config.layer_norm_epsilon)
        local = ops.linear_forward(self.input_region.forward(a, self.tp), self.params["wte.weight"].T)[0]
        gathered = self.tp.all_gather(self.xp.ascontiguousarray(local.transpose(2, 0, 1)))  # vocab first
        return gathered.transpose(1, 2, 0)[..., :self.config.vocab_size]

    # ---- dropout: slices of the dense model's masks ---------------------------------------------------
    def _rng(self, dropout_seed, layer, site, full_shape, index):
        if not self.config.dropout or dropout_seed is None:
            return None
        return _SliceOfFullDraw(self.xp.random.default_rng(dropout_generator_seed(dropout_seed, layer, site)),
                                full_shape, index)

    def _positions(self, length):
        return sequence_slice(length, self.tp) if self.sequence_parallel else slice(0, length)

    def _dropout(self, x, dropout_seed, layer, site):
        """Dropout of a (B, T, C) activation, or of its sequence shard (B, T/tp, C)."""
        B, T, C = x.shape
        full_t = T * self.tp.size if self.sequence_parallel else T
        rng = self._rng(dropout_seed, layer, site, (B, full_t, C), (slice(None), self._positions(full_t)))
        return ops.dropout_forward(x, self.config.dropout if rng else 0.0, rng)

    def _attention_dropout_rng(self, dropout_seed, layer, batch, length):
        """This rank's heads of the (B, n_head, T, T) attention-probability mask."""
        return self._rng(dropout_seed, layer, ATTN_PROBS, (batch, self.config.n_head, length, length),
                         (slice(None), self.heads))

    # ---- vocab-parallel embedding ----------------------------------------------------------------------
    def _embedding_forward(self, idx, dropout_seed):
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        tok, lookup = vocab_parallel_embedding_forward(self.params["wte.weight"], idx, self.vocab_start)
        tok = self.output_region.forward(tok, self.tp)
        x = ops.residual_forward(tok, self.params["wpe.weight"][self._positions(T)])
        x, keep_mask = self._dropout(x, dropout_seed, -1, EMBEDDING)
        return x, self.memory.hold({"lookup": lookup, "dropout": keep_mask, "length": T})

    def _embedding_backward(self, cache, dx):
        self.memory.release(cache)
        dx = ops.dropout_backward(dx, cache["dropout"])
        self.grads["wpe.weight"][self._positions(cache["length"])] += dx.sum(0)
        dtok = self.output_region.backward(dx, self.tp)
        self.grads["wte.weight"] += vocab_parallel_embedding_backward(dtok, cache["lookup"], self.vocab_rows)

    # ---- LM head tied to the vocab-parallel wte, vocab-parallel cross-entropy -------------------------
    def _head_forward(self, x, targets):
        p = self.params
        a, ln_f = ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], self.config.layer_norm_epsilon)
        a = self.input_region.forward(a, self.tp)
        logits, _ = ops.linear_forward(a, p["wte.weight"].T)  # (B, T, V/tp)
        loss, ce = vocab_parallel_cross_entropy_forward(logits, targets, self.vocab_start, self.config.vocab_size,
                                                        self.tp)
        return loss, self.memory.hold({"ln_f": ln_f, "lm_head": a, "cross_entropy": ce})

    def _head_backward(self, cache, dloss):
        self.memory.release(cache)
        p, a = self.params, cache["lm_head"]
        dlogits = vocab_parallel_cross_entropy_backward(cache["cross_entropy"], dloss).astype(a.dtype, copy=False)
        da = self.input_region.backward(ops.linear_backward_input(dlogits, p["wte.weight"].T), self.tp)
        self.grads["wte.weight"] += ops.matmul(dlogits.reshape(-1, dlogits.shape[-1]).T, a.reshape(-1, a.shape[-1]))
        dx, dw, db = ops.layernorm_backward(da, cache["ln_f"], p["ln_f.weight"])
        self.grads["ln_f.weight"] += dw
        self.grads["ln_f.bias"] += db
        return dx

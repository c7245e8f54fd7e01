"""GPT-2's parallel plan (see model/parallel/plan.py): its parameter names per pipeline stage, how
each is sharded under tensor parallelism, its tied embedding, and a stage's forward/backward.

    attention c_attn   column-parallel by heads: n_head/tp heads, their q, k and v columns
    attention c_proj   row-parallel (rows of this rank's heads); bias replicated, added after the reduce
    mlp c_fc           column-parallel;  mlp c_proj row-parallel
    wte                vocab-parallel rows (vocabulary padded to a multiple of tp with zero rows); the
                       LM head is tied to it, and the cross-entropy runs on the sharded logits
    LayerNorms, wpe    replicated (their gradients are sequence-partial under sequence parallelism)

Every sublayer is input region → column-parallel → local op → row-parallel → output region
(model/parallel/tensor_parallel/tensor_parallel_communications.py): one all-reduce forward and one
backward, or with sequence parallelism an all-gather and a reduce-scatter each way, LayerNorm/
dropout/residual then running on (B, T/tp, C) sequence shards. The block is the dense model's
(model/block.py), given the stage's regions and this rank's heads. Dropout masks are drawn for the
full tensor and sliced, so training is the same as the dense model's whatever tp is. Without tensor
parallelism the regions are identities and the loss is the dense cross-entropy, so a stage computes
exactly what model/gpt.py computes.
"""
from __future__ import annotations

from ringpipe.model.nn import ops
from ringpipe.model.gpt2.block import ATTN_PROBS, EMBEDDING, TransformerBlocks, dropout_generator_seed
from ringpipe.model.gpt2.checkpoint import PREFIX
from ringpipe.model.gpt2.config import GPTConfig, init_params, param_shapes
from ringpipe.model.gpt2.model import _keep_large_arrays_on_the_heap
from ringpipe.model.parallel.plan import REPLICATED, Sharding, column_parallel, row_parallel, vocab_parallel
from ringpipe.model.parallel.tensor_parallel.layers import (SliceOfFullDraw, vocab_parallel_cross_entropy_backward,
                                                   vocab_parallel_cross_entropy_forward,
                                                   vocab_parallel_embedding_backward,
                                                   vocab_parallel_embedding_forward)

BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")
SEQUENCE_PARTIAL = Sharding(sequence_partial=True)  # LayerNorm gains and biases, wpe
# c_attn's columns are [q | k | v], each split by heads.
_BLOCK_SHARDINGS = {"attn.c_attn.weight": column_parallel(1, parts=3), "attn.c_attn.bias": column_parallel(0, parts=3),
                    "attn.c_proj.weight": row_parallel(0), "mlp.c_fc.weight": column_parallel(1),
                    "mlp.c_fc.bias": column_parallel(0), "mlp.c_proj.weight": row_parallel(0)}


class GPT2ParallelPlan:
    """The plan of a GPT-2 of `config` (see model/parallel/plan.py for the members)."""

    tied_params = ("wte.weight",)  # the LM head is the token embedding

    def __init__(self, config: GPTConfig):
        self.config = config
        self.dtype, self.device, self.num_layers = config.dtype, config.device, config.n_layer

    def init_params(self, seed: int) -> dict:
        return init_params(self.config, seed)

    def init_params_of(self, seed: int, names, dtype) -> dict:
        return init_params(self.config, seed, names, dtype)

    def param_shapes(self) -> dict:
        return param_shapes(self.config)

    def embedding_params(self) -> list[str]:
        return ["wte.weight", "wpe.weight"]

    def block_params(self, i: int) -> list[str]:
        return [f"h.{i}.{name}" for name in BLOCK_PARAMS]

    def head_params(self) -> list[str]:
        return ["wte.weight", "ln_f.weight", "ln_f.bias"]

    def hf_name(self, name: str) -> str:
        """The parameter's Hugging Face name, under which checkpoints store it."""
        return PREFIX + name

    def sharding(self, name: str) -> Sharding:
        if name == "wte.weight":
            return vocab_parallel(0)
        if name.startswith("h."):
            part = name.split(".", 2)[2]
            return SEQUENCE_PARTIAL if part.startswith("ln_") else _BLOCK_SHARDINGS.get(part, REPLICATED)
        return SEQUENCE_PARTIAL  # wpe, ln_f

    def check_tensor_parallel(self, size: int, rank: int, sequence_parallel: bool) -> None:
        config = self.config
        if config.n_head % size:
            raise ValueError(f"tensor parallel: n_head {config.n_head} is not divisible by tp {size} (rank {rank})")
        if config.mlp_width % size:
            raise ValueError(f"tensor parallel: the MLP width {config.mlp_width} (n_inner) is not divisible by tp "
                             f"{size} (rank {rank})")
        if sequence_parallel and config.block_size % size:
            raise ValueError(f"sequence parallel: block_size {config.block_size} is not divisible by tp {size}")

    def stage_pieces(self, stage) -> GPT2StagePieces:
        if self.device == "cpu":
            _keep_large_arrays_on_the_heap()  # as the dense GPT does: activations reuse freed heap pages
        return GPT2StagePieces(self.config, stage)


class StageBinding:
    """What a family's pieces take from their `Stage` (parameters, memory, regions, this rank's heads
    and vocabulary rows), and dropout masks drawn as this rank's slices of the dense model's, so every
    layout drops the same elements. GPT-2's and BERT's pieces share it."""

    def __init__(self, config, stage):
        self.config, self.stage = config, stage
        self.params, self.memory, self.tp, self.xp = stage.params, stage.memory, stage.tp, stage.xp
        self.input_region, self.output_region = stage.input_region, stage.output_region
        self.local_heads = config.n_head // stage.tp_size
        self.heads = slice(stage.tp_rank * self.local_heads, (stage.tp_rank + 1) * self.local_heads)
        self.vocab_rows = -(-config.vocab_size // stage.tp_size)  # per rank, after padding to a multiple of tp
        self.vocab_start = stage.tp_rank * self.vocab_rows

    def _rng(self, dropout_seed, layer, site, full_shape, index):
        if not self.config.dropout or dropout_seed is None:
            return None
        rng = self.xp.random.default_rng(dropout_generator_seed(dropout_seed, layer, site))
        return SliceOfFullDraw(rng, full_shape, index) if self.stage.tensor_parallel else rng

    def _dropout(self, x, dropout_seed, layer, site):
        """Dropout of a (B, T, C) activation, or of its sequence shard (B, T/tp, C)."""
        B, T, C = x.shape
        full_t = T * self.stage.tp_size if self.stage.sequence_parallel else T
        rng = self._rng(dropout_seed, layer, site, (B, full_t, C), (slice(None), self.stage.positions(full_t)))
        return ops.dropout_forward(x, self.config.dropout if rng else 0.0, rng)


class GPT2StagePieces(StageBinding, TransformerBlocks):
    """GPT-2's embedding, blocks and head for one `Stage`: its parameters (this rank's shards), memory,
    regions and tensor-parallel communicator."""

    def __init__(self, config: GPTConfig, stage):
        super().__init__(config, stage)
        # Recomputing attention twice would repeat its collectives.
        self.recompute_one_half_at_a_time = not stage.tensor_parallel

    def _attention_dropout_rng(self, dropout_seed, layer, batch, length):
        """This rank's heads of the (B, n_head, T, T) attention-probability mask."""
        return self._rng(dropout_seed, layer, ATTN_PROBS, (batch, self.config.n_head, length, length),
                         (slice(None), self.heads))

    # ---- vocab-parallel embedding ----------------------------------------------------------------------
    def embedding_forward(self, idx, dropout_seed):
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if self.stage.tensor_parallel:
            tok, lookup = vocab_parallel_embedding_forward(self.params["wte.weight"], idx, self.vocab_start)
            tok = self.output_region.forward(tok, self.tp)
        else:  # the dense lookup (an id outside the vocabulary is an IndexError, as in model/gpt.py)
            tok, lookup = ops.embedding_forward(self.params["wte.weight"], idx)
        x = ops.residual_forward(tok, self.params["wpe.weight"][self.stage.positions(T)])
        x, keep_mask = self._dropout(x, dropout_seed, -1, EMBEDDING)
        return x, self.memory.hold({"lookup": lookup, "dropout": keep_mask, "length": T})

    def embedding_backward(self, cache, dx) -> dict:
        self.memory.release(cache)
        dx = ops.dropout_backward(dx, cache["dropout"])
        dwpe = self.xp.zeros_like(self.params["wpe.weight"])
        dwpe[self.stage.positions(cache["length"])] = dx.sum(0)
        if self.stage.tensor_parallel:
            dtok = self.output_region.backward(dx, self.tp)
            dwte = vocab_parallel_embedding_backward(dtok, cache["lookup"], self.vocab_rows)
        else:
            dwte = ops.embedding_backward(dx, cache["lookup"], self.config.vocab_size)
        return {"wte.weight": dwte, "wpe.weight": dwpe}

    def embedding_at(self, idx, start):
        """Inference: idx int (B, T) at positions start .. start + T -> x (B, T, C), whole on every
        tensor-parallel rank (no sequence parallelism), no dropout."""
        if self.stage.tensor_parallel:
            tok, _ = vocab_parallel_embedding_forward(self.params["wte.weight"], idx, self.vocab_start)
            tok = self.output_region.forward(tok, self.tp)
        else:
            tok = self.params["wte.weight"][idx]
        return tok + self.params["wpe.weight"][start:start + idx.shape[1]]

    # ---- LM head tied to the vocab-parallel wte, vocab-parallel cross-entropy -------------------------
    def head_forward(self, x, targets):
        p = self.params
        a, ln_f = ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], self.config.layer_norm_epsilon)
        a = self.input_region.forward(a, self.tp)
        logits, _ = ops.linear_forward(a, p["wte.weight"].T)  # (B, T, V/tp)
        if self.stage.tensor_parallel:
            loss, ce = vocab_parallel_cross_entropy_forward(logits, targets, self.vocab_start,
                                                            self.config.vocab_size, self.tp)
        else:  # the dense model's (fused kernel) cross-entropy
            loss, ce = ops.cross_entropy_forward(logits, targets, overwrite_logits=True)
        return loss, self.memory.hold({"ln_f": ln_f, "lm_head": a, "cross_entropy": ce})

    def head_backward(self, cache, dloss):
        self.memory.release(cache)
        p, a = self.params, cache["lm_head"]
        backward = (vocab_parallel_cross_entropy_backward if self.stage.tensor_parallel
                    else ops.cross_entropy_backward)
        # float32 after a float16 forward: rounded to the model's dtype
        dlogits = backward(cache["cross_entropy"], dloss).astype(a.dtype, copy=False)
        da = self.input_region.backward(ops.linear_backward_input(dlogits, p["wte.weight"].T), self.tp)
        dwte = ops.matmul(dlogits.reshape(-1, dlogits.shape[-1]).T, a.reshape(-1, a.shape[-1]))
        dx, dw, db = ops.layernorm_backward(da, cache["ln_f"], p["ln_f.weight"])
        return dx, {"wte.weight": dwte, "ln_f.weight": dw, "ln_f.bias": db}

    def head_logits(self, x):
        """x (B, T, C) -> full logits (B, T, vocab_size), the vocabulary shards gathered."""
        a, _ = ops.layernorm_forward(x, self.params["ln_f.weight"], self.params["ln_f.bias"],
                                     self.config.layer_norm_epsilon)
        local = ops.linear_forward(self.input_region.forward(a, self.tp), self.params["wte.weight"].T)[0]
        if not self.stage.tensor_parallel:
            return local
        gathered = self.tp.all_gather(self.xp.ascontiguousarray(local.transpose(2, 0, 1)))  # vocab first
        return gathered.transpose(1, 2, 0)[..., :self.config.vocab_size]

"""GPT-2's inventory for the planner: the tensors each piece caches, and the FLOPs it computes.

Written from model/gpt2/block.py, model/gpt2/parallel_plan.py and the op pairs of model/nn (the
caches their forwards return); tests/test_planner_memory.py holds it to `ActivationMemory`'s
measurement of real runs, so a change to what the model caches must change this file too.

Shapes: B micro-batch rows, T sequence length, C n_embd, F the MLP width, H heads, V vocabulary,
t tensor-parallel size; with sequence parallelism the LayerNorm/dropout/residual tensors hold
T/t positions (`rows` below is B·T or B·T/t).
"""
from __future__ import annotations

from ringpipe.model.gpt2.config import GPTConfig, param_shapes
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.nn import kernels
from ringpipe.model.nn.causal_attention import _query_blocks
from ringpipe.model.planning.activations import RINGPIPE_STORAGE, Storage, Tensor


class GPT2Inventory:
    """The planner's view of a GPT-2 of `config` (see model/planning/family.py for the members)."""

    family = "gpt2"
    recompute = True  # block.py rebuilds a block's caches from its input

    def __init__(self, config: GPTConfig, attention_kernel: bool | None = None):
        self.config = config
        self.plan = GPT2ParallelPlan(config)
        # The C attention kernel keeps packed triangles; None: whether it is usable in this process.
        self.attention_kernel = (kernels.enabled and kernels.library() is not None
                                 and config.dtype in ("float32", "float16")) if attention_kernel is None \
            else attention_kernel

    def param_shapes(self) -> dict:
        if not hasattr(self, "_shapes"):
            self._shapes = param_shapes(self.config)
        return self._shapes

    def sample_batch(self, B: int, rng):
        """(inputs, targets) of a micro-batch of B rows as the first and last stage take them (random
        ids: calibration times the pieces on them, tools/plan_calibration.py)."""
        T, V = self.config.block_size, self.config.vocab_size
        return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))

    # ---- activations ------------------------------------------------------------------------------
    def _layernorm(self, name, rows, storage):
        C = self.config.n_embd
        if storage.layernorm == "input":
            return [Tensor(f"{name}.input", rows * C, "activation")]
        return [Tensor(f"{name}.normalized", rows * C, "activation", wide=True),
                Tensor(f"{name}.rstd", rows, "statistics")]

    def _probabilities(self, B, T, heads, storage):
        """Elements of one layer's kept softmax output (this rank's heads)."""
        if storage.causal_layout == "full":
            return B * heads * T * T
        head_size = self.config.n_embd // self.config.n_head
        if self.config.dropout == 0 and self.attention_kernel and kernels.attention_fits(head_size):
            return B * heads * int(kernels.causal_rows(T)[-1])
        return B * heads * sum((end - start) * end for start, end in _query_blocks(T))

    def block_tensors(self, B: int, T: int, tp: int = 1, sequence_parallel: bool = False,
                      storage: Storage = RINGPIPE_STORAGE, layer: int = 0) -> list[Tensor]:
        """What block_forward caches (no recompute) for one micro-batch of B rows."""
        C, F, H = self.config.n_embd, self.config.mlp_width, self.config.n_head
        rows = B * T // tp if sequence_parallel and tp > 1 else B * T
        dropout = self.config.dropout > 0
        probs = self._probabilities(B, T, H // tp, storage)
        tensors = self._layernorm("ln_1", rows, storage)
        tensors += [Tensor("attn.c_attn.input", rows * C, "activation"),
                    Tensor("attn.qkv", B * T * 3 * C // tp, "activation", wide=True),
                    Tensor("attn.probs", probs, "softmax", selective=True)]
        if dropout:
            tensors.append(Tensor("attn.probs_dropout_mask", probs, "mask", selective=True, wide=True))
            if storage.attention_dropout_output:
                tensors.append(Tensor("attn.probs_after_dropout", probs, "softmax", selective=True))
        tensors.append(Tensor("attn.c_proj.input", B * T * C // tp, "activation"))
        if dropout:
            tensors.append(Tensor("attn.residual_dropout_mask", rows * C, "mask"))
        tensors += self._layernorm("ln_2", rows, storage)
        tensors += [Tensor("mlp.c_fc.input", rows * C, "activation"),
                    Tensor("mlp.gelu.input", B * T * F // tp, "activation")]
        if storage.gelu_keeps_sigmoid:
            tensors.append(Tensor("mlp.gelu.sigmoid", B * T * F // tp, "activation"))
        tensors.append(Tensor("mlp.c_proj.input", B * T * F // tp, "activation"))
        if dropout:
            tensors.append(Tensor("mlp.residual_dropout_mask", rows * C, "mask"))
        return tensors

    def recompute_tensors(self, B, T, tp=1, sequence_parallel=False) -> list[Tensor]:
        """What block_forward caches with full recompute: the block's input."""
        rows = B * T // tp if sequence_parallel and tp > 1 else B * T
        return [Tensor("block.input", rows * self.config.n_embd, "activation")]

    @staticmethod
    def recompute_halves(tensors: list[Tensor], tp: int) -> list[list[Tensor]]:
        """The caches a recomputing backward rebuilds at once: the MLP half, then the attention
        half (the dense block); both together on a tensor-parallel stage (block.py says why)."""
        if tp > 1:
            return [tensors]
        mlp = [t for t in tensors if t.name.startswith(("ln_2", "mlp."))]
        return [mlp, [t for t in tensors if t not in mlp]]

    def deferred_tensors(self, B, T, tp=1) -> list[Tensor]:
        """What block_backward_input keeps for the weight gradients (each linear's input and dout)."""
        C, F = self.config.n_embd, self.config.mlp_width
        return [Tensor("mlp.c_proj.input", B * T * F // tp, "activation"),
                Tensor("mlp.c_proj.dout", B * T * C, "activation"),
                Tensor("mlp.c_fc.input", B * T * C, "activation"),
                Tensor("mlp.c_fc.dout", B * T * F // tp, "activation"),
                Tensor("attn.c_proj.input", B * T * C // tp, "activation"),
                Tensor("attn.c_proj.dout", B * T * C, "activation"),
                Tensor("attn.c_attn.input", B * T * C, "activation"),
                Tensor("attn.c_attn.dout", B * T * 3 * C // tp, "activation")]

    def embedding_tensors(self, B, T, tp=1, sequence_parallel=False) -> list[Tensor]:
        rows = B * T // tp if sequence_parallel and tp > 1 else B * T
        tensors = [Tensor("embedding.token_ids", B * T, "index")]
        if tp > 1:
            tensors.append(Tensor("embedding.on_this_rank", B * T, "index", itemsize=1))
        if self.config.dropout > 0:
            tensors.append(Tensor("embedding.dropout_mask", rows * self.config.n_embd, "mask"))
        return tensors

    def head_tensors(self, B, T, tp=1, sequence_parallel=False, storage=RINGPIPE_STORAGE) -> list[Tensor]:
        rows = B * T // tp if sequence_parallel and tp > 1 else B * T
        vocab = -(-self.config.vocab_size // tp)
        tensors = self._layernorm("ln_f", rows, storage)
        tensors += [Tensor("lm_head.input", B * T * self.config.n_embd, "activation"),
                    Tensor("cross_entropy.probs", B * T * vocab, "softmax"),
                    Tensor("cross_entropy.targets", B * T, "index"),
                    Tensor("cross_entropy.valid", B * T, "index", itemsize=1)]
        if tp > 1:
            tensors.append(Tensor("cross_entropy.on_this_rank", B * T, "index", itemsize=1))
        return tensors

    # ---- compute ------------------------------------------------------------------------------------
    def block_flops(self, B, T, tp=1) -> float:
        """Forward FLOPs of one block on one tp rank: the linears and the full (T, T) attention
        matmuls, as model-FLOPs counts take them (the backward is twice this)."""
        C, F = self.config.n_embd, self.config.mlp_width
        return 2 * B * T * (4 * C * C + 2 * C * F) / tp + 4 * B * T * T * C / tp

    def head_flops(self, B, T, tp=1) -> float:
        return 2 * B * T * self.config.n_embd * self.config.vocab_size / tp

    def block_elements(self, B, T, tp=1) -> float:
        """Elements the block's elementwise passes touch in its forward (LayerNorms, GeLU, softmax,
        residuals, dropout): what costs time besides the matmuls on a CPU."""
        C, F = self.config.n_embd, self.config.mlp_width
        return B * T * (8 * C + 3 * F / tp) + 2 * B * (self.config.n_head // tp) * T * T

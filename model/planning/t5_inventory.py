"""T5's inventory for the planner: the tensors each piece caches, and the FLOPs it computes.

Written from model/t5/layers.py and model/t5/parallel_plan.py (a stage's pieces on the packed
(B, Te + Td + table rows, C) activation); tests/test_planner_memory.py holds it to `ActivationMemory`'s
measurement of real runs. The plan's layers are the encoder's, then the decoder's, so a layer's
tensors depend on which it is (`block_tensors(..., layer=i)`). Te and Td are the encoder and decoder
lengths of a span-corrupted window of block_size tokens; H the heads, K = num_heads × d_kv the
attention width, F = d_ff. A decoder layer's cross-attention keeps the encoder output, a view of
the packed activation, so it holds the whole packed array. Weight gradients are computed in the
backward-input pass (nothing is deferred); T5 has no recompute and no sequence parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

from ringpipe.model.data.span_corruption import corrupted_lengths
from ringpipe.model.planning.activations import RINGPIPE_STORAGE, Storage, Tensor
from ringpipe.model.t5.config import T5Config, param_shapes
from ringpipe.model.t5.parallel_plan import T5ParallelPlan


@dataclass(frozen=True)
class PlannerView:
    """T5's config under the names the planner uses for every family."""
    n_layer: int  # encoder + decoder layers: the plan's blocks
    n_head: int
    n_embd: int
    block_size: int  # the packed activation's positions: what a pipeline message carries
    vocab_size: int
    dtype: str
    dropout: float
    mlp_width: int


class T5Inventory:
    """The planner's view of a T5 of `config` (see model/planning/family.py for the members)."""

    family = "t5"
    recompute = False
    uniform_layers = False  # encoder and decoder layers cache different tensors

    def __init__(self, config: T5Config):
        self.t5 = config
        self.plan = T5ParallelPlan(config)
        self.encoder_length, self.decoder_length = corrupted_lengths(config.block_size)
        self.config = PlannerView(self.plan.num_layers, config.num_heads, config.d_model, self.packed_length(1),
                                  config.vocab_size, config.dtype, config.dropout_rate, config.d_ff)

    def packed_length(self, tp: int) -> int:
        """Positions of the packed activation on a tp rank: encoder, decoder, and the rows that carry
        both stacks' position-bias tables (this rank's heads' columns)."""
        table = self.t5.relative_attention_num_buckets * (self.t5.num_heads // tp)
        return self.encoder_length + self.decoder_length + -(-2 * table // self.t5.d_model)

    def sample_batch(self, B: int, rng):
        """(packed [encoder ids | decoder input ids] (B, Te + Td), targets (B, Td)): random ids."""
        V, Te, Td = self.t5.vocab_size, self.encoder_length, self.decoder_length
        return rng.integers(0, V, (B, Te + Td)), rng.integers(0, V, (B, Td))

    def param_shapes(self) -> dict:
        if not hasattr(self, "_shapes"):
            self._shapes = param_shapes(self.t5)
        return self._shapes

    # ---- activations ------------------------------------------------------------------------------
    def _sublayer_entry(self, name, B, T):
        """RMS norm (normalized x, 1/rms per row) and the column linear's input."""
        C = self.t5.d_model
        return [Tensor(f"{name}.norm.normalized", B * T * C, "activation", wide=True),
                Tensor(f"{name}.norm.rstd", B * T, "statistics"),
                Tensor(f"{name}.input", B * T * C, "activation")]

    def _self_attention(self, name, B, T, tp, storage):
        K, heads = self.t5.num_heads * self.t5.d_kv, self.t5.num_heads // tp
        probs = B * heads * T * T
        tensors = self._sublayer_entry(name, B, T) + [
            Tensor(f"{name}.qkv", B * T * 3 * K // tp, "activation", wide=True),
            Tensor(f"{name}.probs", probs, "softmax", selective=True)]
        tensors += self._dropouts(name, B, T, probs, storage)
        return tensors + [Tensor(f"{name}.o.input", B * T * K // tp, "activation")]

    def _dropouts(self, name, B, T, probs, storage):
        if not self.t5.dropout_rate:
            return []
        tensors = [Tensor(f"{name}.probs_dropout_mask", probs, "mask", selective=True, wide=True),
                   Tensor(f"{name}.output_dropout_mask", B * T * self.t5.d_model, "mask")]
        if storage.attention_dropout_output:
            tensors.append(Tensor(f"{name}.probs_after_dropout", probs, "softmax", selective=True))
        return tensors

    def _feed_forward(self, name, B, T, tp):
        F = self.t5.d_ff // tp
        if self.t5.gated:  # [gate | up] (the linear's output), sigmoid(2z) of the gate, gelu(gate)
            tensors = [Tensor(f"{name}.wi.output", B * T * 2 * F, "activation"),
                       Tensor(f"{name}.gelu.sigmoid", B * T * F, "activation"),
                       Tensor(f"{name}.gelu.output", B * T * F, "activation")]
        else:
            tensors = [Tensor(f"{name}.relu.positive", B * T * F, "index", itemsize=1)]
        tensors.append(Tensor(f"{name}.wo.input", B * T * F, "activation"))
        if self.t5.dropout_rate:
            tensors += [Tensor(f"{name}.hidden_dropout_mask", B * T * F, "mask"),
                        Tensor(f"{name}.output_dropout_mask", B * T * self.t5.d_model, "mask")]
        return self._sublayer_entry(name, B, T) + tensors

    def _final_norm(self, name, B, T):
        tensors = [Tensor(f"{name}.normalized", B * T * self.t5.d_model, "activation", wide=True),
                   Tensor(f"{name}.rstd", B * T, "statistics")]
        if self.t5.dropout_rate:
            tensors.append(Tensor(f"{name}.dropout_mask", B * T * self.t5.d_model, "mask"))
        return tensors

    def block_tensors(self, B: int, T: int, tp: int = 1, sequence_parallel: bool = False,
                      storage: Storage = RINGPIPE_STORAGE, layer: int = 0) -> list[Tensor]:
        """What plan layer `layer` (the encoder's first, then the decoder's) holds for B rows."""
        config, Te, Td, C = self.t5, self.encoder_length, self.decoder_length, self.t5.d_model
        if layer < config.num_layers:
            tensors = [Tensor("buckets", Te * Te, "index")]
            tensors += self._self_attention("attention", B, Te, tp, storage) + self._feed_forward("ff", B, Te, tp)
            if layer == config.num_layers - 1:
                tensors += self._final_norm("encoder.final_norm", B, Te)
            return tensors
        K, heads = config.num_heads * config.d_kv, config.num_heads // tp
        cross = B * heads * Td * Te
        wide_copy = storage.itemsize("activation", config.dtype, True) != storage.itemsize("activation", config.dtype)
        tensors = [Tensor("buckets", Td * Td, "index")] + self._self_attention("attention", B, Td, tp, storage)
        tensors += self._sublayer_entry("cross", B, Td) + [
            Tensor("cross.q", B * Td * K // tp, "activation", wide=True),
            # the encoder output: a float32 copy of it for a float16 model, else the packed activation
            Tensor("cross.encoder_output", B * Te * C, "activation", wide=True) if wide_copy
            else Tensor("cross.packed_input", B * self.packed_length(tp) * C, "activation"),
            Tensor("cross.kv", B * Te * 2 * K // tp, "activation", wide=True),
            Tensor("cross.probs", cross, "softmax", selective=True)]
        tensors += self._dropouts("cross", B, Td, cross, storage)
        tensors += [Tensor("cross.o.input", B * Td * K // tp, "activation")] + self._feed_forward("ff", B, Td, tp)
        if layer == self.plan.num_layers - 1:
            tensors += self._final_norm("decoder.final_norm", B, Td)
        return tensors

    def recompute_tensors(self, B, T, tp=1, sequence_parallel=False) -> list[Tensor]:
        raise ValueError("T5 has no recompute")

    def deferred_tensors(self, B, T, tp=1) -> list[Tensor]:
        return []  # the weight gradients are computed in the backward-input pass

    def embedding_tensors(self, B, T, tp=1, sequence_parallel=False) -> list[Tensor]:
        Tp = self.encoder_length + self.decoder_length
        tensors = [Tensor("embedding.token_ids", B * Tp, "index")]
        if tp > 1:
            tensors += [Tensor("embedding.local_ids", B * Tp, "index"),
                        Tensor("embedding.on_this_rank", B * Tp, "index", itemsize=1)]
        if self.t5.dropout_rate:
            tensors.append(Tensor("embedding.dropout_masks", B * Tp * self.t5.d_model, "mask"))
        return tensors

    def head_tensors(self, B, T, tp=1, sequence_parallel=False, storage=RINGPIPE_STORAGE) -> list[Tensor]:
        Td, C = self.decoder_length, self.t5.d_model
        vocab = -(-self.t5.vocab_size // tp)
        scaled = self.t5.scale_decoder_outputs  # a scaled copy of the decoder's output, else the packed array
        tensors = [Tensor("lm_head.input", B * Td * C if scaled else B * self.packed_length(tp) * C, "activation"),
                   Tensor("cross_entropy.probs", B * Td * vocab, "softmax"),
                   Tensor("cross_entropy.targets", B * Td, "index"),
                   Tensor("cross_entropy.valid", B * Td, "index", itemsize=1)]
        if tp > 1:
            tensors.append(Tensor("cross_entropy.on_this_rank", B * Td, "index", itemsize=1))
        return tensors

    # ---- compute: per block, the mean of the encoder's and the decoder's layers --------------------
    def _layer_flops(self, B, T_query, T_key, tp, cross):
        C, K, F = self.t5.d_model, self.t5.num_heads * self.t5.d_kv, self.t5.d_ff
        wi = 2 * F if self.t5.gated else F
        flops = 2 * B * T_query * (4 * C * K + C * wi + F * C) / tp + 4 * B * T_query * T_query * K / tp
        if cross:
            flops += 2 * B * (T_query * 2 * C * K + T_key * 2 * C * K) / tp + 4 * B * T_query * T_key * K / tp
        return flops

    def block_flops(self, B, T, tp=1) -> float:
        t5, Te, Td = self.t5, self.encoder_length, self.decoder_length
        total = (t5.num_layers * self._layer_flops(B, Te, Te, tp, False)
                 + t5.num_decoder_layers * self._layer_flops(B, Td, Te, tp, True))
        return total / self.plan.num_layers

    def head_flops(self, B, T, tp=1) -> float:
        return 2 * B * self.decoder_length * self.t5.d_model * self.t5.vocab_size / tp

    def block_elements(self, B, T, tp=1) -> float:
        C, F, heads = self.t5.d_model, self.t5.d_ff, self.t5.num_heads // tp
        Te, Td = self.encoder_length, self.decoder_length
        rows = (self.t5.num_layers * B * Te + self.t5.num_decoder_layers * 2 * B * Td) / self.plan.num_layers
        squares = (self.t5.num_layers * Te * Te + self.t5.num_decoder_layers * (Td * Td + Td * Te)) / self.plan.num_layers
        return rows * (6 * C + 3 * F / tp) + 2 * B * heads * squares

"""BERT's inventory for the planner: the tensors each piece caches, and the FLOPs it computes.

Written from model/bert/layers.py and the op pairs of model/nn (the caches their forwards return);
tests/test_planner_memory.py holds it to `ActivationMemory`'s measurement of real runs, so a change
to what BERT caches must change this file too. Shapes as in gpt2_inventory.py; BERT's attention
sees every position (its probabilities are whole (T, T) squares), its LayerNorms come after each
sublayer (post-LN) and its MLM head adds a transform (dense, erf GeLU, LayerNorm) before the tied
decoder. It has no recompute.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.bert.config import param_shapes
from ringpipe.model.bert.parallel_plan import BertParallelPlan
from ringpipe.model.data.masking import IGNORE_INDEX
from ringpipe.model.planning.activations import RINGPIPE_STORAGE, Storage, Tensor
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory


class BertInventory(GPT2Inventory):
    """The planner's view of a BERT of `config` (see model/planning/family.py for the members)."""

    family = "bert"
    recompute = False  # BERT's layers have no recompute path

    def __init__(self, config):
        self.config = config
        self.plan = BertParallelPlan(config)

    def param_shapes(self) -> dict:
        if not hasattr(self, "_shapes"):
            self._shapes = param_shapes(self.config)
        return self._shapes

    def sample_batch(self, B: int, rng):
        """Masked-LM rows: 15 % of positions carry a target (-100 elsewhere); with the next-sentence
        head, ids and token types (B, 2, T) and the label at targets[:, 0]."""
        T, V = self.config.block_size, self.config.vocab_size
        ids = rng.integers(0, V, (B, T))
        targets = np.where(rng.random((B, T)) < 0.15, rng.integers(0, V, (B, T)), IGNORE_INDEX)
        if self.config.next_sentence:
            ids = np.stack([ids, (np.arange(T) >= T // 2) * np.ones((B, 1), int)], axis=1)
            targets[:, 0] = rng.integers(0, 2, B)
        return ids, targets

    def _rows(self, B, T, tp, sequence_parallel):
        return B * T // tp if sequence_parallel and tp > 1 else B * T

    def block_tensors(self, B: int, T: int, tp: int = 1, sequence_parallel: bool = False,
                      storage: Storage = RINGPIPE_STORAGE, layer: int = 0) -> list[Tensor]:
        """What BertPieces.block_forward holds for one micro-batch of B rows."""
        C, F, H = self.config.n_embd, self.config.mlp_width, self.config.n_head
        rows = self._rows(B, T, tp, sequence_parallel)
        dropout = self.config.dropout > 0
        probs = B * (H // tp) * T * T
        tensors = [Tensor("x", rows * C, "activation"),
                   Tensor("attention.qkv", B * T * 3 * C // tp, "activation", wide=True),
                   Tensor("attention.probs", probs, "softmax", selective=True)]
        if dropout:
            tensors.append(Tensor("attention.probs_dropout_mask", probs, "mask", selective=True, wide=True))
            if storage.attention_dropout_output:
                tensors.append(Tensor("attention.probs_after_dropout", probs, "softmax", selective=True))
        tensors.append(Tensor("attention.output.dense.input", B * T * C // tp, "activation"))
        if dropout:
            tensors.append(Tensor("attention.output.dropout_mask", rows * C, "mask"))
        tensors += self._layernorm("attention.output.LayerNorm", rows, storage)
        tensors += [Tensor("mid", rows * C, "activation"),
                    Tensor("intermediate.gelu.input", B * T * F // tp, "activation")]
        if storage.gelu_keeps_sigmoid:  # erf GeLU keeps Phi(x) as the tanh one keeps its sigmoid
            tensors.append(Tensor("intermediate.gelu.cdf", B * T * F // tp, "activation"))
        tensors.append(Tensor("output.dense.input", B * T * F // tp, "activation"))
        if dropout:
            tensors.append(Tensor("output.dropout_mask", rows * C, "mask"))
        tensors += self._layernorm("output.LayerNorm", rows, storage)
        return tensors

    def recompute_tensors(self, B, T, tp=1, sequence_parallel=False) -> list[Tensor]:
        raise ValueError("BERT has no recompute")

    def embedding_tensors(self, B, T, tp=1, sequence_parallel=False) -> list[Tensor]:
        rows = self._rows(B, T, tp, sequence_parallel)
        pairs = 2 if self.config.next_sentence else 1  # sentence pairs: ids and token types in one array
        tensors = [Tensor("embedding.token_ids", pairs * B * T, "index")]
        if tp > 1:
            tensors += [Tensor("embedding.local_ids", B * T, "index"),
                        Tensor("embedding.on_this_rank", B * T, "index", itemsize=1)]
        tensors += self._layernorm("embeddings.LayerNorm", rows, RINGPIPE_STORAGE)
        if self.config.dropout > 0:
            tensors.append(Tensor("embedding.dropout_mask", rows * self.config.n_embd, "mask"))
        return tensors

    def head_tensors(self, B, T, tp=1, sequence_parallel=False, storage=RINGPIPE_STORAGE) -> list[Tensor]:
        C = self.config.n_embd
        rows = self._rows(B, T, tp, sequence_parallel)
        vocab = -(-self.config.vocab_size // tp)
        tensors = [Tensor("transform.input", rows * C, "activation"),
                   Tensor("transform.gelu.input", rows * C, "activation"),
                   Tensor("transform.gelu.cdf", rows * C, "activation")]
        tensors += self._layernorm("transform.LayerNorm", rows, storage)
        tensors += [Tensor("decoder.input", B * T * C, "activation"),
                    Tensor("cross_entropy.probs", B * T * vocab, "softmax"),
                    Tensor("cross_entropy.targets", B * T, "index"),
                    Tensor("cross_entropy.valid", B * T, "index", itemsize=1)]
        if tp > 1:
            tensors.append(Tensor("cross_entropy.on_this_rank", B * T, "index", itemsize=1))
        if self.config.next_sentence:  # the [CLS] row (a view of the input unless gathered), pooled
            if sequence_parallel and tp > 1:
                tensors.append(Tensor("next_sentence.gathered_input", B * T * C, "activation"))
            tensors += [Tensor("next_sentence.pooled", B * C, "activation"),
                        Tensor("next_sentence.probs", B * 2, "softmax"),
                        Tensor("next_sentence.targets", B, "index"),
                        Tensor("next_sentence.valid", B, "index", itemsize=1)]
        return tensors

    # ---- compute ------------------------------------------------------------------------------------
    def head_flops(self, B, T, tp=1) -> float:
        C = self.config.n_embd
        return 2 * B * T * C * C + 2 * B * T * C * self.config.vocab_size / tp

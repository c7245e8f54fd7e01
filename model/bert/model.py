"""The dense BERT for masked-LM training, with a hand-written backward (model/bert/layers.py's op
pairs with identity regions), Hugging Face I/O and fill-mask predictions.

Batches are whole rows of one segment without padding (masking.py makes them), so attention needs
no padding mask; every token is of type 0.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.bert.checkpoint import load_checkpoint, save_checkpoint
from ringpipe.model.bert.config import BertConfig, init_params, param_shapes
from ringpipe.model.bert.layers import IGNORE_INDEX, BertPieces
from ringpipe.model.nn.activation_memory import ActivationMemory
from ringpipe.model.nn.mixed_precision import overflow_expected
from ringpipe.model.nn.optim import FlatArrays, flat_order
from ringpipe.model.parallel.tensor_parallel.tensor_parallel_communications import IDENTITY
from ringpipe.runtime.array_module import array_module, to_host


class Bert:
    """The dense BERT with its MLM head. `params` is a flat dict of the names in config.py.

    It is the host of its pieces as a one-rank parallel stage would be: identity regions, no
    tensor-parallel group, every position."""

    tp, tp_size, tp_rank, tensor_parallel, sequence_parallel = None, 1, 0, False, False
    input_region = output_region = IDENTITY

    def __init__(self, config: BertConfig, seed: int = 0, params: dict | None = None, threads: int = 1):
        """`threads` is accepted for the trainers' sake; BERT's step runs on one thread (BLAS may use more)."""
        self.config = config
        self.xp = array_module(config.device)
        self.dtype = np.dtype(config.dtype)
        given = init_params(config, seed) if params is None else params
        # In config.py's order whatever the source (a checkpoint lists them otherwise), so that
        # sums over the parameters (the gradient norm) run in one order and a resumed run is bitwise
        # the uninterrupted one.
        host = {name: np.asarray(to_host(given[name])) for name in param_shapes(config)}
        self.params = FlatArrays(self.xp.empty(sum(p.size for p in host.values()), self.dtype),
                                 {name: p.shape for name, p in host.items()}, flat_order(host))
        for name, p in host.items():
            self.params[name][...] = self.xp.asarray(p.astype(self.dtype))
        self.memory = ActivationMemory()
        self.pieces = BertPieces(config, self)
        self._dropout_seeds = np.random.default_rng([seed, 1])

    @staticmethod
    def positions(length: int) -> slice:
        return slice(0, length)

    def forward(self, idx):
        """Inference logits, no dropout: idx int (B, T) -> logits (B, T, vocab_size)."""
        x, cache = self.pieces.embedding_forward(idx)
        self.memory.release(cache)
        for i in range(self.config.n_layer):
            x, cache = self.pieces.block_forward(i, x)
            self.memory.release(cache)
        return self.pieces.head_logits(x)

    def loss(self, idx, targets) -> float:
        """Inference loss, no dropout: the training loss of (idx, targets) (see loss_and_grads)."""
        x, cache = self.pieces.embedding_forward(idx)
        self.memory.release(cache)
        for i in range(self.config.n_layer):
            x, cache = self.pieces.block_forward(i, x)
            self.memory.release(cache)
        loss, cache = self.pieces.head_forward(x, targets)
        self.memory.release(cache)
        return loss

    def next_sentence_logits(self, idx):
        """idx int (B, 2, T) token ids and token types -> next-sentence logits (B, 2) (0: the second
        segment follows the first, 1: it is random); the config must have the head."""
        x, cache = self.pieces.embedding_forward(idx)
        self.memory.release(cache)
        for i in range(self.config.n_layer):
            x, cache = self.pieces.block_forward(i, x)
            self.memory.release(cache)
        return self.pieces.next_sentence_logits(x)

    def loss_and_grads(self, idx, targets, dropout_seed=None, dloss=1.0):
        """One forward+backward: idx int (B, T) (or (B, 2, T) with token types), targets int (B, T)
        (-100 where no loss; with the next-sentence head, its label at [:, 0]) -> (mean loss over the
        chosen positions, plus the next-sentence loss, and grads like params); the grads are of
        `dloss` × that loss."""
        if self.config.dropout and dropout_seed is None:
            dropout_seed = int(self._dropout_seeds.integers(2**63))
        self.memory.reset()
        with overflow_expected(self.dtype):
            x, embedding_cache = self.pieces.embedding_forward(idx, dropout_seed)
            caches = []
            for i in range(self.config.n_layer):
                x, cache = self.pieces.block_forward(i, x, dropout_seed)
                caches.append(cache)
            loss, head_cache = self.pieces.head_forward(x, targets)
            dx, grads = self.pieces.head_backward(head_cache, dloss)
            for i in reversed(range(self.config.n_layer)):
                dx, layer_grads = self.pieces.block_backward(i, caches.pop(), dx)
                grads.update(layer_grads)
            embedding_grads = self.pieces.embedding_backward(embedding_cache, dx)
        for name, g in embedding_grads.items():
            grads[name] = grads[name] + g if name in grads else g  # the word embeddings are tied
        return loss, {name: grads[name] for name in self.params}

    def fill_mask(self, idx, mask_id: int, top_k: int = 5):
        """idx int (T,) holding `mask_id` somewhere -> per masked position (in order), the top_k
        (token id, probability) pairs; ValueError if no position is masked."""
        idx = np.asarray(idx).reshape(-1)
        where = np.flatnonzero(idx == mask_id)
        if not where.size:
            raise ValueError("the text has no mask token to fill")
        logits = np.asarray(to_host(self.forward(self.xp.asarray(idx[None, :]))), dtype=np.float64)[0]
        predictions = []
        for position in where:
            row = logits[position] - logits[position].max()
            probs = np.exp(row) / np.exp(row).sum()
            best = np.argsort(-probs, kind="stable")[:top_k]
            predictions.append([(int(token), float(probs[token])) for token in best])
        return predictions

    def save_pretrained(self, directory, tokenizer=None):
        """Writes model.safetensors + config.json (transformers' BertForMaskedLM format), atomically."""
        save_checkpoint(directory, {k: to_host(v) for k, v in self.params.items()}, self.config, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None):
        """Loads a checkpoint written by ringpipe or by transformers' BertForMaskedLM."""
        config, params = load_checkpoint(directory, dtype=dtype, device=device)
        return cls(config, params=params)


__all__ = ["Bert", "IGNORE_INDEX"]

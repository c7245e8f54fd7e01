"""GPT-2 (pre-LN, tied LM head) as stages of op pairs, with a hand-written backward.

Stages are the units later parallel schedules split: the embedding stage, block i, and the
head+loss stage. Each has `*_forward -> (output, cache)` and `*_backward(cache, dout) ->
(dinput, grads)`; a block can also run its backward as input-gradient now, weight-gradient later.
The block is model/gpt2/block.py, shared with the tensor-parallel stage; sampling is
model/gpt2/generation.py; the config and the parameters' names and shapes are model/gpt2/config.py.
Every cache is registered with `ActivationMemory`, so the bytes held between forward and backward
are measured, not guessed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

from ringpipe.model.gpt2 import generation
from ringpipe.model.gpt2.block import (ATTN_PROBS, EMBEDDING, IdentityRegion, TransformerBlocks,
                              dropout_generator_seed)
from ringpipe.model.gpt2.checkpoint import load_checkpoint, save_checkpoint
from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.model.nn import ops
from ringpipe.model.nn.activation_memory import ActivationMemory
from ringpipe.model.nn.mixed_precision import overflow_expected
from ringpipe.model.nn.optim import FlatArrays, flat_order
from ringpipe.runtime.array_module import array_module, to_host

_heap_tuned = False


def _keep_large_arrays_on_the_heap():
    """Stops glibc from handing each freed activation array back to the kernel.

    By default, arrays over 128 KiB are mmap'ed and unmapped again on free, so every training
    step page-faults its activations in afresh (~9000 faults per step of the benchmark model,
    about as long as all its matmuls). Raising the mmap and trim thresholds lets freed arrays
    be reused. Process-wide and harmless elsewhere; a no-op without glibc.
    """
    global _heap_tuned
    if _heap_tuned:
        return
    _heap_tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: heap for arrays up to 32 MiB
    except (OSError, AttributeError):
        pass


class GPT(TransformerBlocks):
    """The dense GPT-2. `params` is a flat dict with GPT-2 public names (see `param_shapes`).

    Its blocks (`block_forward`, `block_backward_input`, ...) are `TransformerBlocks` with every
    head here and identity regions around the linears.
    """

    def __init__(self, config: GPTConfig, seed: int = 0, params: dict | None = None,
                 threads: int = 1):
        self.config = config
        self.xp = array_module(config.device)
        if config.device == "cpu":
            _keep_large_arrays_on_the_heap()
        self.dtype = np.dtype(config.dtype)
        host = {name: np.asarray(to_host(p)) for name, p in
                (init_params(config, seed) if params is None else params).items()}
        # Views into one buffer (FlatArrays): AdamW then updates them in whole-buffer passes.
        self.params = FlatArrays(self.xp.empty(sum(p.size for p in host.values()), self.dtype),
                                 {name: p.shape for name, p in host.items()}, flat_order(host))
        for name, p in host.items():
            self.params[name][...] = self.xp.asarray(p.astype(self.dtype))
        self.memory = ActivationMemory()
        self.local_heads = config.n_head
        self.input_region = self.output_region = IdentityRegion
        self.tp = None  # no tensor-parallel group: the regions communicate nothing
        self.threads = threads  # row shards of a batch run at once in loss_and_grads (NumPy)
        self._executor = self._blas = None
        self._dropout_seeds = np.random.default_rng([seed, 1])

    # ------------------------------------------------------------------ dropout randomness

    def _rng(self, dropout_seed, layer, site):
        if not self.config.dropout or dropout_seed is None:
            return None
        return self.xp.random.default_rng(dropout_generator_seed(dropout_seed, layer, site))

    def _dropout(self, x, dropout_seed, layer, site):
        rng = self._rng(dropout_seed, layer, site)
        return ops.dropout_forward(x, self.config.dropout if rng else 0.0, rng)

    def _attention_dropout_rng(self, dropout_seed, layer, batch, length):
        return self._rng(dropout_seed, layer, ATTN_PROBS)

    # ------------------------------------------------------------------ embedding stage

    def embedding_forward(self, idx, dropout_seed=None):
        """idx int (B, T) -> x (B, T, C)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        tok, idx = ops.embedding_forward(self.params["wte.weight"], idx)
        x = ops.residual_forward(tok, self.params["wpe.weight"][:T])
        x, keep_mask = self._dropout(x, dropout_seed, -1, EMBEDDING)
        return x, self.memory.hold({"idx": idx, "dropout": keep_mask})

    def embedding_at(self, idx, start):
        """Inference: idx int (B, T) at positions start .. start + T -> x (B, T, C), no dropout."""
        return self.params["wte.weight"][idx] + self.params["wpe.weight"][start:start + idx.shape[1]]

    def embedding_backward(self, cache, dx):
        """dx (B, T, C) -> (None, {wte.weight, wpe.weight} grads)."""
        self.memory.release(cache)
        dx = ops.dropout_backward(dx, cache["dropout"])
        dtok, dpos = ops.residual_backward(dx)
        dwpe = self.xp.zeros_like(self.params["wpe.weight"])
        dwpe[:dx.shape[1]] = dpos.sum(0)
        dwte = ops.embedding_backward(dtok, cache["idx"], self.config.vocab_size)
        return None, {"wte.weight": dwte, "wpe.weight": dwpe}

    # ------------------------------------------------------------------ head + loss stage

    def head_forward(self, x, targets, ignore_index=-1):
        """x (B, T, C), targets int (B, T) -> (mean cross-entropy loss as float, cache)."""
        p = self.params
        a, ln_f = ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"],
                                        self.config.layer_norm_epsilon)
        logits, lm_head = ops.linear_forward(a, p["wte.weight"].T)  # tied to wte
        loss, ce = ops.cross_entropy_forward(logits, targets, ignore_index, overwrite_logits=True)
        return loss, self.memory.hold({"ln_f": ln_f, "lm_head": lm_head, "cross_entropy": ce})

    def head_backward(self, cache, dloss=1.0):
        """-> (dx (B, T, C), grads {wte.weight (the LM-head share), ln_f.weight, ln_f.bias})."""
        self.memory.release(cache)
        p = self.params
        # float32 after a float16 forward (see ops.cross_entropy_forward): round to the model's dtype
        dlogits = ops.cross_entropy_backward(cache["cross_entropy"], dloss).astype(self.dtype,
                                                                                    copy=False)
        da = ops.linear_backward_input(dlogits, p["wte.weight"].T)
        dlogits2d = dlogits.reshape(-1, dlogits.shape[-1])
        a = cache["lm_head"]
        dwte = ops.matmul(dlogits2d.T, a.reshape(-1, a.shape[-1]))  # (V, C), Conv1D's dW transposed
        dx, dw, db = ops.layernorm_backward(da, cache["ln_f"], p["ln_f.weight"])
        return dx, {"wte.weight": dwte, "ln_f.weight": dw, "ln_f.bias": db}

    def head_logits(self, x):
        """x (B, T, C) -> logits (B, T, V)."""
        a, _ = ops.layernorm_forward(x, self.params["ln_f.weight"], self.params["ln_f.bias"],
                                     self.config.layer_norm_epsilon)
        return ops.linear_forward(a, self.params["wte.weight"].T)[0]

    # ------------------------------------------------------------------ whole model

    def forward(self, idx):
        """Inference logits, no dropout: idx int (B, T) -> logits (B, T, vocab_size)."""
        x, cache = self.embedding_forward(idx)
        self.memory.release(cache)
        for i in range(self.config.n_layer):
            x, cache = self.block_forward(i, x)
            self.memory.release(cache)
        return self.head_logits(x)

    def loss(self, idx, targets, ignore_index=-1) -> float:
        """Inference loss, no dropout: the mean cross-entropy of idx's logits against targets."""
        return ops.cross_entropy_forward(self.forward(idx), targets, ignore_index, overwrite_logits=True)[0]

    def loss_and_grads(self, idx, targets, ignore_index=-1, dropout_seed=None, dloss=1.0):
        """One forward+backward. idx, targets int (B, T) -> (loss float, grads like params).

        The gradients are of `dloss` × the mean loss (a mixed-precision run's loss scale).

        With `self.threads` > 1 (NumPy only) the batch is split into that many row shards that run
        at once on threads with single-threaded BLAS, and their gradients are summed: the same
        math, using every core for the elementwise work too. `memory.peak_bytes` afterwards holds
        the peak of cached activations during the step (all shards together).
        """
        with overflow_expected(self.dtype):  # this thread's shard and the sums; the others see to theirs
            return self._loss_and_grads(idx, targets, ignore_index, dropout_seed, dloss)

    def _loss_and_grads(self, idx, targets, ignore_index, dropout_seed, dloss):
        if self.config.dropout and dropout_seed is None:
            dropout_seed = int(self._dropout_seeds.integers(2**63))
        self.memory.reset()
        shards = min(self.threads, idx.shape[0]) if self.xp is np else 1
        if shards == 1:
            loss, grads = self._shard_loss_and_grads(idx, targets, ignore_index, dropout_seed, dloss)
            return loss, grads
        rows = np.array_split(np.arange(idx.shape[0]), shards)
        counts = [int((targets[r] != ignore_index).sum()) for r in rows]
        total = max(sum(counts), 1)
        seeds = [None if dropout_seed is None else
                 int(np.random.SeedSequence([dropout_seed, k]).generate_state(1)[0])
                 for k in range(shards)]

        def run(k):
            return self._shard_loss_and_grads(idx[rows[k]], targets[rows[k]], ignore_index,
                                              seeds[k], dloss=dloss * counts[k] / total)

        with self._blas_single_thread():
            futures = [self._pool().submit(run, k) for k in range(1, shards)]
            loss, grads = run(0)
            loss *= counts[0] / total
            other_grads = []
            for k, future in enumerate(futures, start=1):
                shard_loss, shard_grads = future.result()
                loss += shard_loss * counts[k] / total
                other_grads.append(shard_grads)
        if not (isinstance(self.params, FlatArrays) and self.params.intact()):
            for shard_grads in other_grads:
                for name, g in shard_grads.items():
                    grads[name] += g
            return loss, grads
        # The shard sums land in a buffer laid out like the parameters, for AdamW's flat update;
        # the additions are the same, in the same order.
        summed = FlatArrays(self.xp.empty_like(self.params.flat),
                            {name: p.shape for name, p in self.params.items()}, self.params.order)
        for name, total_grad in summed.items():
            self.xp.add(grads[name], other_grads[0][name], out=total_grad)
            for shard_grads in other_grads[1:]:
                total_grad += shard_grads[name]
        return loss, summed

    def _shard_loss_and_grads(self, idx, targets, ignore_index, dropout_seed, dloss=1.0):
        """The serial step: embedding, blocks, head forward; then backward through them all."""
        with overflow_expected(self.dtype):  # errstate is per thread: shards run on several
            return self._serial_loss_and_grads(idx, targets, ignore_index, dropout_seed, dloss)

    def _serial_loss_and_grads(self, idx, targets, ignore_index, dropout_seed, dloss):
        x, embedding_cache = self.embedding_forward(idx, dropout_seed)
        block_caches = []
        for i in range(self.config.n_layer):
            x, cache = self.block_forward(i, x, dropout_seed)
            block_caches.append(cache)
        loss, head_cache = self.head_forward(x, targets, ignore_index)
        del x
        dx, grads = self.head_backward(head_cache, dloss)
        del head_cache
        for i in reversed(range(self.config.n_layer)):
            dx, block_grads = self.block_backward(i, block_caches.pop(), dx)
            grads.update(block_grads)
        _, embedding_grads = self.embedding_backward(embedding_cache, dx)
        grads["wte.weight"] += embedding_grads["wte.weight"]  # tied: LM head + embedding
        grads["wpe.weight"] = embedding_grads["wpe.weight"]
        return loss, {name: grads[name] for name in self.params}

    def _pool(self):
        if self._executor is None or self._executor._max_workers != self.threads - 1:
            self._executor = ThreadPoolExecutor(self.threads - 1, "gpt-shard")
        return self._executor

    def _blas_single_thread(self):
        if self._blas is None:
            self._blas = ThreadpoolController()
        return self._blas.limit(limits=1, user_api="blas")

    # ------------------------------------------------------------------ generation (KV cache)

    def prefill(self, idx):
        """idx int (B, T) -> (logits (B, T, V), kv cache); see model/gpt2/generation.py."""
        return generation.prefill(self, idx)

    def decode_step(self, kv, tokens):
        """tokens int (B,) at position kv["length"] -> logits (B, V), using and extending kv."""
        return generation.decode_step(self, kv, tokens)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None):
        """Samples max_new_tokens after idx int (B, T) -> (B, T + max_new_tokens); temperature 0
        picks the most likely token. See model/gpt2/generation.py."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, seed)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory, tokenizer=None):
        """Writes model.safetensors + config.json (Hugging Face GPT-2 format), atomically."""
        save_checkpoint(directory, {k: to_host(v) for k, v in self.params.items()},
                        self.config, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None):
        """Loads a checkpoint written by ringpipe or by transformers' GPT2LMHeadModel."""
        config, params = load_checkpoint(directory, dtype=dtype, device=device)
        return cls(config, params=params)


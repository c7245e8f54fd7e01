"""The activation inventory: every tensor a model's forward caches for its backward, by name.

A model family lists, per piece (embedding, block, head), the tensors its op pairs keep (`Tensor`:
a name, an element count and a role); a `Storage` turns roles into bytes. `RINGPIPE_STORAGE` is
what ringpipe's own op pairs keep (its tests compare it with `ActivationMemory`'s measurement);
`MEGATRON_STORAGE` is Megatron-LM's choices (16-bit activations, 1-byte dropout masks, LayerNorm
keeping its input, GeLU keeping its input only, attention keeping its dropout output), under which
a GPT-2 block adds up to Korthikanti et al. 2022's 34·s·b·h + 5·a·s²·b bytes.

Roles:
    activation   a tensor of the model's dtype (hidden states, linear inputs, q/k/v, GeLU input)
    mask         a dropout keep-mask
    softmax      attention probabilities (and with Megatron storage the dropped-out copy)
    statistics   per-row LayerNorm statistics (1/std)
    index        integer token ids / targets, boolean masks of the loss
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROLES = ("activation", "mask", "softmax", "statistics", "index")


@dataclass(frozen=True)
class Tensor:
    """One cached tensor: `elements` of `role`; `itemsize` fixes its bytes per element where the op
    decides it whatever the storage (token ids: 8), None where the storage does."""
    name: str
    elements: int
    role: str
    itemsize: int | None = None
    selective: bool = False  # rebuilt by selective (attention-core) recompute, so not kept then
    wide: bool = False  # computed in float32 for a float16 model (LayerNorm, attention), cached so

    def nbytes(self, storage: "Storage", dtype) -> int:
        return self.elements * (self.itemsize or storage.itemsize(self.role, dtype, self.wide))


@dataclass(frozen=True)
class Storage:
    """How a framework stores what its backward needs.

    activation_bytes / mask_bytes / softmax_bytes: bytes per element, None = the model's dtype
    (softmax: float32 for float16 models, which compute attention in float32).
    layernorm: "normalized" (xhat, rstd: ringpipe) or "input" (the input only: Megatron).
    gelu_keeps_sigmoid: ringpipe caches sigmoid(2z) beside the input so its backward has no exp.
    attention_dropout_output: the dropped-out probabilities are kept for the AV backward (Megatron)
    rather than remade from probs × mask (ringpipe).
    causal_layout: "ringpipe" keeps the softmax output as its attention does (packed lower
    triangles from the C kernel, else blocks of queries against the keys they see); "full" keeps
    the whole (T, T) square per head.
    float16_compute_float32: float16 models compute LayerNorm/attention in float32 and cache that.
    """
    activation_bytes: int | None = None
    mask_bytes: int | None = None
    softmax_bytes: int | None = None
    layernorm: str = "normalized"
    gelu_keeps_sigmoid: bool = True
    attention_dropout_output: bool = False
    causal_layout: str = "ringpipe"
    float16_compute_float32: bool = True

    def itemsize(self, role: str, dtype, wide: bool = False) -> int:
        size = np.dtype(dtype).itemsize
        widened = 4 if (self.float16_compute_float32 and size < 4) else size
        if role == "activation":
            return self.activation_bytes or (widened if wide else size)
        if role == "mask":
            return self.mask_bytes or (widened if wide else size)
        if role == "softmax":
            return self.softmax_bytes or widened
        if role == "statistics":
            return widened
        if role == "index":
            return 8
        raise ValueError(f"activation inventory: unknown role {role!r}; expected one of {ROLES}")


RINGPIPE_STORAGE = Storage()
MEGATRON_STORAGE = Storage(activation_bytes=2, mask_bytes=1, softmax_bytes=2, layernorm="input",
                           gelu_keeps_sigmoid=False, attention_dropout_output=True, causal_layout="full",
                           float16_compute_float32=False)


def total_bytes(tensors, storage: Storage, dtype, selective_recompute: bool = False) -> int:
    """Bytes of `tensors` under `storage`; with selective recompute the attention core is not kept."""
    return sum(t.nbytes(storage, dtype) for t in tensors if not (selective_recompute and t.selective))

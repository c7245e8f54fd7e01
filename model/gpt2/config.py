"""GPT-2's configuration and the parameters it defines: names, shapes and initial values.

The model (model/gpt2/model.py), its checkpoints (checkpoint.py) and the parallel trainer all read
these; this file imports nothing of them, so they depend on it one way.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ringpipe.runtime.array_module import DEVICES

DTYPES = ("float32", "float64", "float16")  # float16: the model of a mixed-precision run
# The GPTConfig fields that decide what function the weights compute; the others (dropout, dtype,
# device, recompute) say how a run computes it.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_inner",
                       "layer_norm_epsilon", "scale_attn_weights",
                       "scale_attn_by_inverse_layer_idx")


@dataclass
class GPTOptions:
    """What a run chooses about its GPT: the shape and how the blocks compute. `GPTConfig` adds the
    three fields decided elsewhere: vocab_size (the tokenizer's), dtype and device (the run's, for
    all of its arrays). A training run holds these as `TrainConfig.model`."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    dropout: float = 0.0
    recompute: bool = False  # blocks cache only their input and recompute the rest in backward
    # GPT-2 variants transformers' GPT2Config can describe (model/gpt2_hf_config.py maps them):
    n_inner: int | None = None  # MLP width; None is GPT-2's 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # attention scores divided by sqrt(head size)
    scale_attn_by_inverse_layer_idx: bool = False  # ... and by (layer index + 1)


@dataclass
class GPTConfig(GPTOptions):
    """The model: its options plus vocab_size, the array dtype and the device; validated here."""
    vocab_size: int = 50257
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by "
                             f"n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"GPTConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"GPTConfig.device must be one of {DEVICES}, got {self.device!r}")
        for name in ("recompute", "scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.n_inner is not None and (isinstance(self.n_inner, bool)
                                         or not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"GPTConfig.n_inner must be a positive int or None, got "
                             f"{self.n_inner!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be a positive finite number, "
                             f"got {eps!r}")

    @property
    def mlp_width(self) -> int:
        """Columns of mlp.c_fc: n_inner, or 4 * n_embd when that is None."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def attention_scale(self, layer: int) -> float:
        """The factor on q.k scores in block `layer` (0-based), as GPT2Attention computes it."""
        scale = 1.0 / math.sqrt(self.n_embd // self.n_head) if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale

    def to_dict(self) -> dict:
        return asdict(self)


def param_shapes(config: GPTConfig) -> dict:
    """GPT-2 public parameter names -> shapes, in a fixed order (the order init draws them)."""
    C, V, F = config.n_embd, config.vocab_size, config.mlp_width
    shapes = {"wte.weight": (V, C), "wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, F), h + "mlp.c_fc.bias": (F,),
            h + "mlp.c_proj.weight": (F, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def init_params(config: GPTConfig, seed: int = 0, names=None, dtype=np.float64) -> dict:
    """GPT-2 init as NumPy arrays: N(0, 0.02) weights, residual projections scaled by
    1/sqrt(2 n_layer), zero biases, LayerNorm ones/zeros; drawn in float64, independent of the
    model's dtype and device. `names`: keep only these (every weight is still drawn, in order, so
    the values are the same; one at a time, so the memory is theirs and one tensor's), cast to `dtype`."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        keep = names is None or name in names
        if name.endswith(".bias"):
            value = np.zeros(shape, dtype) if keep else None
        elif ".ln_" in name or name.startswith("ln_f"):
            value = np.ones(shape, dtype) if keep else None
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std /= math.sqrt(2 * config.n_layer)
            value = _normal(rng, std, shape, dtype, keep)
        if keep:
            params[name] = value
    return params


def _normal(rng, std: float, shape, dtype, keep: bool, chunk: int = 1 << 22):
    """rng.normal(0, std, shape) cast to dtype (None when not kept: the draw only advances rng),
    drawn in float64 chunks: the same values in the same order, without a float64 copy of a large
    tensor (the embedding of a 50k vocabulary is 0.4 GB in float64)."""
    out = np.empty(math.prod(shape), dtype) if keep else None
    for start in range(0, math.prod(shape), chunk):
        values = rng.normal(0.0, std, size=min(chunk, math.prod(shape) - start))
        if keep:
            out[start:start + values.size] = values
    return out.reshape(shape) if keep else None

"""T5's configuration and the parameters it defines: names, shapes and initial values.

ringpipe's parameter names follow transformers' layout but fuse what one matmul computes:
self-attention's q, k, v into `attn.qkv` and cross-attention's k, v into `cross.kv` (columns in
that order), gated-GELU's wi_0, wi_1 into `ff.wi` ([gate | up]). Linear weights are (in, out), the
layout of model/nn/ops.py; model/t5/checkpoint.py splits and transposes them to and from
transformers' names. The LM head is the shared embedding (transformers 5 always ties it), its input
scaled by d_model^-0.5 when `scale_decoder_outputs` (original T5; v1.1 checkpoints say no).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ringpipe.model.data.span_corruption import corrupted_lengths
from ringpipe.runtime.array_module import DEVICES

DTYPES = ("float32", "float64")
FEED_FORWARD_PROJ = ("relu", "gated-gelu")
# The T5Config fields that decide what function the weights compute.
ARCHITECTURE_FIELDS = ("d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                       "relative_attention_num_buckets", "relative_attention_max_distance",
                       "layer_norm_epsilon", "feed_forward_proj", "scale_decoder_outputs",
                       "vocab_size")
PAD_ID = 0  # transformers' T5 default pad_token_id, also the decoder's start token


@dataclass
class T5Config:
    """A T5 of transformers' T5Config shape plus the run's dtype and device; validated here."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: as many as the encoder
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0  # at every site transformers' T5 drops (model/t5/layers.py)
    feed_forward_proj: str = "relu"
    scale_decoder_outputs: bool = True
    pad_token_id: int = PAD_ID
    decoder_start_token_id: int = PAD_ID
    eos_token_id: int | None = 1
    # ringpipe's, not transformers': a training window's tokens before span corruption, which fixes
    # the encoder and decoder lengths of a packed batch (`encoder_length`). T5 has no position table.
    block_size: int = 512
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                     "num_heads", "relative_attention_num_buckets",
                     "relative_attention_max_distance", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ValueError(f"T5Config.feed_forward_proj {self.feed_forward_proj!r} is not "
                             f"supported (accepted: {', '.join(FEED_FORWARD_PROJ)})")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            # the decoder's buckets: half of them exact distances, the rest logarithmic up to it
            raise ValueError(f"T5Config.relative_attention_max_distance "
                             f"{self.relative_attention_max_distance} must exceed half the "
                             f"{self.relative_attention_num_buckets} buckets")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"T5Config.layer_norm_epsilon must be a positive finite number, "
                             f"got {eps!r}")
        if isinstance(self.dropout_rate, bool) or not isinstance(self.dropout_rate, (int, float)) \
                or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if not isinstance(self.scale_decoder_outputs, bool):
            raise ValueError(f"T5Config.scale_decoder_outputs must be a bool, got "
                             f"{self.scale_decoder_outputs!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"T5Config.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"T5Config.device must be one of {DEVICES}, got {self.device!r}")

    @property
    def inner_dim(self) -> int:
        """Attention width: num_heads × d_kv (need not equal d_model)."""
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @property
    def ff_columns(self) -> int:
        """Columns of ff.wi: d_ff, or [gate | up] = 2 d_ff when gated."""
        return 2 * self.d_ff if self.gated else self.d_ff

    @property
    def encoder_length(self) -> int:
        """Encoder tokens of a training window of block_size tokens after span corruption: packed
        inputs (model/t5/family.py) are [encoder ids | decoder ids] split here."""
        return corrupted_lengths(self.block_size)[0]

    def to_dict(self) -> dict:
        return asdict(self)


def encoder_layer_shapes(config: T5Config, i: int) -> dict:
    C, inner, F = config.d_model, config.inner_dim, config.ff_columns
    h = f"encoder.{i}."
    return {h + "attn_norm.weight": (C,), h + "attn.qkv.weight": (C, 3 * inner),
            h + "attn.o.weight": (inner, C), h + "ff_norm.weight": (C,),
            h + "ff.wi.weight": (C, F), h + "ff.wo.weight": (config.d_ff, C)}


def decoder_layer_shapes(config: T5Config, i: int) -> dict:
    C, inner, F = config.d_model, config.inner_dim, config.ff_columns
    h = f"decoder.{i}."
    return {h + "attn_norm.weight": (C,), h + "attn.qkv.weight": (C, 3 * inner),
            h + "attn.o.weight": (inner, C), h + "cross_norm.weight": (C,),
            h + "cross.q.weight": (C, inner), h + "cross.kv.weight": (C, 2 * inner),
            h + "cross.o.weight": (inner, C), h + "ff_norm.weight": (C,),
            h + "ff.wi.weight": (C, F), h + "ff.wo.weight": (config.d_ff, C)}


def param_shapes(config: T5Config) -> dict:
    """ringpipe's T5 parameter names -> shapes, in a fixed order (the order init draws them)."""
    buckets = (config.relative_attention_num_buckets, config.num_heads)
    shapes = {"shared.weight": (config.vocab_size, config.d_model),
              "encoder.relative_attention_bias.weight": buckets}
    for i in range(config.num_layers):
        shapes.update(encoder_layer_shapes(config, i))
    shapes["encoder.final_norm.weight"] = (config.d_model,)
    shapes["decoder.relative_attention_bias.weight"] = buckets
    for i in range(config.num_decoder_layers):
        shapes.update(decoder_layer_shapes(config, i))
    shapes["decoder.final_norm.weight"] = (config.d_model,)
    return shapes


def _init_std(config: T5Config, name: str) -> float:
    """transformers' T5 init (initializer_factor 1): each weight's standard deviation."""
    C, kv = config.d_model, config.d_kv
    if name == "shared.weight":
        return 1.0
    if name.endswith(("attn.qkv.weight", "cross.q.weight")):
        return (C * kv) ** -0.5  # q's; k and v columns get C^-0.5 (see init_params)
    if name.endswith("ff.wo.weight"):
        return config.d_ff ** -0.5
    if name.endswith(("attn.o.weight", "cross.o.weight")):
        return config.inner_dim ** -0.5
    return C ** -0.5  # cross.kv, ff.wi, relative_attention_bias


def init_params(config: T5Config, seed: int = 0) -> dict:
    """T5 init as float64 NumPy arrays (transformers' T5PreTrainedModel stds), norms ones.
    Independent of dtype and device."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape)
            continue
        params[name] = rng.normal(0.0, _init_std(config, name), size=shape)
        if name.endswith("attn.qkv.weight"):
            params[name][:, config.inner_dim:] *= (config.d_kv ** 0.5)  # k, v: C^-0.5
    return params

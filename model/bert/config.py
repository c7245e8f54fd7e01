"""BERT's configuration and the parameters it defines: names, shapes and initial values.

The options carry ringpipe's names, shared with GPT-2 so that `--n-layer`, `--n-head`, `--n-embd`,
`--block-size` and `--dropout` mean the same for every family; model/bert/hf_config.py maps them to
transformers' BertConfig keys (num_hidden_layers, num_attention_heads, hidden_size,
max_position_embeddings, hidden_dropout_prob = attention_probs_dropout_prob).

Parameter names are transformers' BertForMaskedLM / BertForPreTraining keys without the "bert."
prefix, except that each layer's query, key and value are held fused as `attention.qkv` (C, 3C), and
linear weights are (in, out) as everywhere in ringpipe; model/bert/checkpoint.py converts.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ringpipe.runtime.array_module import DEVICES

DTYPES = ("float32", "float64", "float16")
# The BertConfig fields that decide what function the weights compute.
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "n_inner",
                       "layer_norm_epsilon", "type_vocab_size", "next_sentence")
INIT_STD = 0.02  # transformers' initializer_range


@dataclass
class BertOptions:
    """What a run chooses about its BERT; `BertConfig` adds vocab_size, dtype and device."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 512  # the position table's length (max_position_embeddings)
    dropout: float = 0.0  # hidden and attention-probability dropout alike
    n_inner: int | None = None  # intermediate_size; None is 4 * n_embd
    layer_norm_epsilon: float = 1e-12
    type_vocab_size: int = 2
    next_sentence: bool = False  # the next-sentence head (BertForPreTraining) and sentence-pair rows


@dataclass
class BertConfig(BertOptions):
    """The model: its options plus vocab_size, the array dtype and the device; validated here."""
    vocab_size: int = 30522
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"BertConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and (isinstance(self.n_inner, bool) or not isinstance(self.n_inner, int)
                                         or self.n_inner < 1):
            raise ValueError(f"BertConfig.n_inner must be a positive int or None, got {self.n_inner!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig.dropout must be in [0, 1), got {self.dropout!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"BertConfig.layer_norm_epsilon must be a positive finite number, got {eps!r}")
        if not isinstance(self.next_sentence, bool):
            raise ValueError(f"BertConfig.next_sentence must be a bool, got {self.next_sentence!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"BertConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"BertConfig.device must be one of {DEVICES}, got {self.device!r}")

    @property
    def mlp_width(self) -> int:
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    def to_dict(self) -> dict:
        return asdict(self)


EMBEDDING_PARAMS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                    "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                    "embeddings.LayerNorm.bias")
WORD_EMBEDDINGS = EMBEDDING_PARAMS[0]
LAYER_PARAMS = ("attention.qkv.weight", "attention.qkv.bias", "attention.output.dense.weight",
                "attention.output.dense.bias", "attention.output.LayerNorm.weight",
                "attention.output.LayerNorm.bias", "intermediate.dense.weight", "intermediate.dense.bias",
                "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias")
MLM_HEAD_PARAMS = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                   "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
                   "cls.predictions.bias")
NSP_HEAD_PARAMS = ("pooler.dense.weight", "pooler.dense.bias", "cls.seq_relationship.weight",
                   "cls.seq_relationship.bias")


def layer_prefix(i: int) -> str:
    return f"encoder.layer.{i}."


def head_params(config: BertConfig) -> tuple:
    """The MLM head's parameters, and the next-sentence head's when the config has it."""
    return MLM_HEAD_PARAMS + (NSP_HEAD_PARAMS if config.next_sentence else ())


def param_shapes(config: BertConfig) -> dict:
    """Parameter names -> shapes, in a fixed order (the order init draws them)."""
    C, V, F = config.n_embd, config.vocab_size, config.mlp_width
    shapes = dict(zip(EMBEDDING_PARAMS, [(V, C), (config.block_size, C), (config.type_vocab_size, C), (C,), (C,)]))
    layer = dict(zip(LAYER_PARAMS, [(C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,), (C, F), (F,), (F, C), (C,),
                                    (C,), (C,)]))
    for i in range(config.n_layer):
        shapes.update({layer_prefix(i) + name: shape for name, shape in layer.items()})
    shapes.update(zip(MLM_HEAD_PARAMS, [(C, C), (C,), (C,), (C,), (V,)]))
    if config.next_sentence:
        shapes.update(zip(NSP_HEAD_PARAMS, [(C, C), (C,), (C, 2), (2,)]))
    return shapes


def init_params(config: BertConfig, seed: int = 0) -> dict:
    """transformers' BERT init as float64 NumPy arrays: N(0, 0.02) weights and embeddings, zero
    biases, LayerNorm ones/zeros. Independent of dtype and device."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if "LayerNorm.weight" in name:
            params[name] = np.ones(shape)
        elif name.endswith("bias"):
            params[name] = np.zeros(shape)
        else:
            params[name] = rng.normal(0.0, INIT_STD, size=shape)
    return params

"""GPT-2 with int8 linear weights: which weights are quantized, the inference model, its files.

    quantized   h.{i}.attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj weights (Conv1D, (in, out)):
                int8 values + a float scale per output channel (model/quantization/int8.py)
    float       wte (the embedding, and the tied LM head), wpe, LayerNorms, every bias

On disk (a model directory, like a float one):

    config.json         the float model's config.json plus "quantization_config" (QUANT_METHOD, the
                        scale granularity, the outlier threshold, the quantized weights, the source)
    model.safetensors   float tensors under their Hugging Face names; a quantized weight W as
                        W (int8), W_scale (float32), and with outliers W_outlier_rows (int64) and
                        W_outlier_values (float32)
    tokenizer files     copied from the source

A float reader (transformers, `GPT.from_pretrained`, `train --resume`) refuses the directory by its
quantization_config; `load_int8_gpt` checks every tensor against the config before building the model.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ringpipe.model.gpt2.checkpoint import PREFIX, WEIGHTS_FILE, check_param_shapes, hf_config, read_config_json, \
    weights_metadata
from ringpipe.model.gpt2.config import param_shapes
from ringpipe.model.gpt2.hf_config import gpt_config_from_hf
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.parallel.tensor_parallel.sharding import Sharding, shard
from ringpipe.model.quantization.int8 import GRANULARITIES, Int8Weight
from ringpipe.model.quantization.int8_format import CONFIG_FILE, QUANT_METHOD, QUANTIZATION_KEY
from ringpipe.runtime.files import load_tensors, save_tensors, staged_directory, write_json

QUANTIZATION_RECORD = "ringpipe.quantization"  # the same record in the safetensors metadata
SCALE, OUTLIER_ROWS, OUTLIER_VALUES = "_scale", "_outlier_rows", "_outlier_values"
LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def linear_weight_names(config) -> list[str]:
    """The GPT-2 weights that are linear layers' (in, out) matrices: the ones int8 quantizes."""
    return [f"h.{i}.{name}" for i in range(config.n_layer) for name in LINEAR_WEIGHTS]


class Int8GPT(GPT):
    """The dense GPT-2 for inference, its linear weights `Int8Weight`s: forward, loss, prefill,
    decode_step and generate are GPT's own, the linear layers taking the int8 weights as they are.

    params: GPT-2 names -> float host arrays, and Int8Weight for `linear_weight_names(config)`.
    """

    def __init__(self, config, params: dict, quantization: dict | None = None):
        quantized = {name: w for name, w in params.items() if isinstance(w, Int8Weight)}
        super().__init__(config, params={name: p for name, p in params.items() if name not in quantized})
        for name, weight in quantized.items():  # the float ones live in one buffer, as GPT's do
            self.params[name] = weight.to(self.xp, self.dtype)
        self.quantization = quantization or {}

    def loss_and_grads(self, *args, **kwargs):
        raise TypeError("int8 weights are for inference only: train the float model it was quantized from")

    def weight_bytes(self) -> int:
        """Bytes of every parameter as held: int8 values, scales, outliers and the float tensors."""
        return int(sum(p.nbytes for p in self.params.values()))

    def save_pretrained(self, directory, tokenizer=None):
        save_int8_gpt(directory, self.config, self.params, self.quantization, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None):
        config, params, quantization = load_int8_gpt(directory, dtype=dtype, device=device)
        return cls(config, params, quantization)


def save_int8_gpt(directory, config, params: dict, quantization: dict, tokenizer=None) -> None:
    """Writes an int8 model directory (see the module docstring) atomically: the whole directory
    appears at once. `quantization`: the quantization_config (its "quantized" list is filled in)."""
    quantization = {**quantization, "quant_method": QUANT_METHOD, "bits": 8,
                    "quantized": sorted(name for name, w in params.items() if isinstance(w, Int8Weight))}
    tensors = {}
    for name, value in params.items():
        if isinstance(value, Int8Weight):
            key = PREFIX + name
            tensors[key], tensors[key + SCALE] = _host(value.values), _host(value.scale).astype(np.float32)
            if len(value.outlier_rows):
                tensors[key + OUTLIER_ROWS] = _host(value.outlier_rows)
                tensors[key + OUTLIER_VALUES] = _host(value.outlier_values).astype(np.float32)
        else:
            tensors[PREFIX + name] = _host(value)
    metadata = {**weights_metadata(config), QUANTIZATION_RECORD: json.dumps(quantization, separators=(",", ":"))}
    with staged_directory(directory) as stage:
        save_tensors(os.path.join(stage, WEIGHTS_FILE), tensors, metadata=metadata)
        write_json(os.path.join(stage, CONFIG_FILE), {**hf_config(config), QUANTIZATION_KEY: quantization},
                   indent=2)
        if tokenizer is not None:
            tokenizer.save(stage)


def int8_gpt_config(directory, dtype=None, device=None):
    """-> (GPTConfig, quantization_config) of an int8 model directory, from its config.json alone;
    ValueError naming the file if it is not one `ringpipe quantize` wrote."""
    config_path = os.path.join(os.fspath(directory), CONFIG_FILE)
    hf = read_config_json(config_path)
    quantization = hf.pop(QUANTIZATION_KEY, None)
    if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{config_path}: no {QUANTIZATION_KEY} with quant_method {QUANT_METHOD!r}; "
                         "not an int8 model written by `ringpipe quantize`")
    config = gpt_config_from_hf(hf, config_path, dtype=dtype or "float32", device=device or "cpu")
    if config.dtype not in ("float32", "float64"):
        raise ValueError(f"int8 models compute in float32 or float64, not {config.dtype}")
    return config, quantization


def load_int8_gpt(directory, dtype=None, device=None):
    """-> (GPTConfig, params with Int8Weight for the quantized weights, quantization_config).

    ValueError naming the file and the tensor for anything that does not fit: a tensor missing or
    unexpected, an int8 weight of the wrong dtype or shape, a scale that is not a finite positive
    float per output channel (or one per tensor), an outlier row out of range; CorruptFileError
    (runtime/files.py) for a damaged file."""
    directory = os.fspath(directory)
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    config, quantization = int8_gpt_config(directory, dtype, device)
    tensors, metadata = load_tensors(weights_path)
    if QUANTIZATION_RECORD in metadata and json.loads(metadata[QUANTIZATION_RECORD]) != quantization:
        raise ValueError(f"{config_path}: {QUANTIZATION_KEY} contradicts the record in {weights_path}")
    shapes = param_shapes(config)
    quantized = quantization.get("quantized")
    if not isinstance(quantized, list) or not set(quantized) <= set(linear_weight_names(config)):
        raise ValueError(f"{config_path}: {QUANTIZATION_KEY}.quantized must list linear weights of the model, "
                         f"got {quantized!r:.80}")
    params = {}
    for name in quantized:
        params[name] = _int8_weight(tensors, name, shapes[name], weights_path, quantization.get("granularity"))
    params.update({key[len(PREFIX):]: tensors.pop(key) for key in list(tensors) if key.startswith(PREFIX)})
    unknown = sorted(tensors)
    if unknown:
        raise ValueError(f"{weights_path}: unexpected tensors {unknown[:3]}")
    check_param_shapes(params, shapes, weights_path)
    for name, value in params.items():
        if not isinstance(value, Int8Weight) and value.dtype.kind != "f":
            raise ValueError(f"{weights_path}: {name} is {value.dtype}, expected a float tensor "
                             f"(only {QUANTIZATION_KEY}.quantized weights are int8)")
    return config, params, quantization


def int8_rank_weights(directory, table: dict) -> dict:
    """{name: this rank's shard} of an int8 model directory for every entry of a stage's
    `shard_table()`: Int8Weight shards (values, scales and outliers cut alike) for the quantized
    weights, float arrays for the rest. The file is read whole: at int8 it is a quarter of the float
    model's."""
    _, params, _ = load_int8_gpt(directory)
    return {name: shard(params[name], Sharding("replicated" if entry["axis"] is None else "column", entry["axis"],
                                               entry["parts"]), entry["tp_rank"], entry["tp_size"])
            for name, entry in table.items()}


def _int8_weight(tensors: dict, name: str, shape: tuple, path: str, granularity) -> Int8Weight:
    """Pops W, W_scale and W's outliers from `tensors`; checks each against `shape` (in, out)."""
    key = PREFIX + name
    missing = [k for k in (key, key + SCALE) if k not in tensors]
    if missing:
        raise ValueError(f"{path}: int8 weight {name}: missing tensor {missing[0]}")
    values, scale = tensors.pop(key), tensors.pop(key + SCALE)
    rows = tensors.pop(key + OUTLIER_ROWS, np.zeros(0, np.int64))
    outliers = tensors.pop(key + OUTLIER_VALUES, np.zeros((0, shape[1]), np.float32))
    scales = {"channel": (shape[1],), "tensor": (1,)}.get(granularity)
    if values.dtype != np.int8 or tuple(values.shape) != shape:
        problem = f"is {values.dtype} {tuple(values.shape)}, expected int8 {shape}"
    elif granularity not in GRANULARITIES:
        problem = f"has scale granularity {granularity!r}, expected one of {GRANULARITIES}"
    elif scale.dtype.kind != "f" or tuple(scale.shape) != scales:
        problem = f"scale is {scale.dtype} {tuple(scale.shape)}, expected float {scales}"
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problem = "has a scale that is not a finite positive number"
    elif rows.dtype.kind not in "iu" or rows.ndim != 1 or np.any(rows < 0) or np.any(rows >= shape[0]) \
            or len(np.unique(rows)) != len(rows):
        problem = f"outlier rows must be distinct input features in [0, {shape[0]})"
    elif tuple(outliers.shape) != (len(rows), shape[1]) or not np.all(np.isfinite(outliers)):
        problem = f"outlier values are {tuple(outliers.shape)}, expected finite ({len(rows)}, {shape[1]})"
    else:
        return Int8Weight(values, scale, rows, outliers)
    raise ValueError(f"{path}: int8 weight {name} {problem}")


def _host(array):
    return np.asarray(array.get() if hasattr(array, "get") else array)

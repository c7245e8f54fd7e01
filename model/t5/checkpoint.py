"""T5 checkpoints in transformers' format: `model.safetensors` + `config.json`.

ringpipe's fused weights (model/t5/config.py) are split and transposed into transformers' keys
(`encoder.block.0.layer.0.SelfAttention.q.weight`, (out, in)) on save and joined back on load, so
`T5ForConditionalGeneration.from_pretrained(dir)` opens ringpipe's saves with no missing or
unexpected keys, and ringpipe opens transformers'. The tied copies transformers may store
(`encoder.embed_tokens`, `decoder.embed_tokens`, `lm_head`) must equal `shared.weight`. Writes are
atomic (runtime.files); tensors carry checksums, verified on load.
"""
from __future__ import annotations

import os

import numpy as np

from ringpipe.model.families import hf_part
from ringpipe.model.gpt2.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_config_json
from ringpipe.model.t5.config import DTYPES, T5Config, param_shapes
from ringpipe.model.t5.hf_config import hf_config, t5_config_from_hf
from ringpipe.runtime.files import load_tensors, save_tensors, staged_directory, write_json

TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _layer_keys(config: T5Config, stack: str, i: int) -> dict:
    """ringpipe name -> [(transformers key, column slice of the fused (in, out) weight)]."""
    I, F = config.inner_dim, config.d_ff
    ours, theirs = f"{stack}.{i}.", f"{stack}.block.{i}.layer."
    attn = theirs + "0.SelfAttention."
    keys = {ours + "attn_norm.weight": [(theirs + "0.layer_norm.weight", None)],
            ours + "attn.qkv.weight": [(attn + n + ".weight", slice(j * I, (j + 1) * I))
                                       for j, n in enumerate("qkv")],
            ours + "attn.o.weight": [(attn + "o.weight", slice(None))]}
    ff = 1
    if stack == "decoder":
        cross, ff = theirs + "1.EncDecAttention.", 2
        keys.update({ours + "cross_norm.weight": [(theirs + "1.layer_norm.weight", None)],
                     ours + "cross.q.weight": [(cross + "q.weight", slice(None))],
                     ours + "cross.kv.weight": [(cross + "k.weight", slice(0, I)),
                                                (cross + "v.weight", slice(I, 2 * I))],
                     ours + "cross.o.weight": [(cross + "o.weight", slice(None))]})
    dense = f"{theirs}{ff}.DenseReluDense."
    wi = ([(dense + "wi_0.weight", slice(0, F)), (dense + "wi_1.weight", slice(F, 2 * F))]
          if config.gated else [(dense + "wi.weight", slice(None))])
    keys.update({ours + "ff_norm.weight": [(f"{theirs}{ff}.layer_norm.weight", None)],
                 ours + "ff.wi.weight": wi, ours + "ff.wo.weight": [(dense + "wo.weight", slice(None))]})
    return keys


def key_map(config: T5Config) -> dict:
    """Every ringpipe name -> [(transformers key, columns of ours it holds, transposed; None for a
    vector or table stored as is)]."""
    keys = {"shared.weight": [("shared.weight", None)]}
    for stack, layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        keys[f"{stack}.relative_attention_bias.weight"] = [
            (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None)]
        for i in range(layers):
            keys.update(_layer_keys(config, stack, i))
        keys[f"{stack}.final_norm.weight"] = [(f"{stack}.final_layer_norm.weight", None)]
    return keys


def hf_tensors(config: T5Config) -> list[tuple]:
    """`key_map` as model/families.py's `hf_tensors`: [(key, name, columns or None, transposed)]."""
    return [(key, name, columns, columns is not None) for name, parts in key_map(config).items()
            for key, columns in parts]


def to_transformers(params: dict, config: T5Config) -> dict:
    """ringpipe names -> transformers' keys and layouts (host arrays)."""
    return {key: hf_part(np.asarray(params[name]), columns, transposed)
            for key, name, columns, transposed in hf_tensors(config)}


def from_transformers(tensors: dict, config: T5Config, path: str) -> dict:
    """transformers' keys -> ringpipe names; ValueError naming `path` and the key if one is
    missing, unexpected, mis-shaped or a tied copy that differs from shared.weight."""
    tensors = dict(tensors)
    for key in TIED_COPIES:
        if key in tensors:
            copy = tensors.pop(key)
            if "shared.weight" not in tensors:
                tensors["shared.weight"] = copy
            elif not np.array_equal(copy, tensors["shared.weight"]):
                raise ValueError(f"{path}: {key} differs from shared.weight; ringpipe's T5 ties "
                                 "them (as transformers 5 does)")
    params, shapes = {}, param_shapes(config)
    for name, parts in key_map(config).items():
        missing = [key for key, _ in parts if key not in tensors]
        if missing:
            raise ValueError(f"{path}: missing {missing[0]} (config.json implies it)")
        arrays = [tensors.pop(key) for key, _ in parts]
        if parts[0][1] is None:
            params[name] = arrays[0]
        else:
            params[name] = np.concatenate([a.T for a in arrays], axis=1)
        if tuple(params[name].shape) != shapes[name]:
            raise ValueError(f"{path}: {parts[0][0]} has a shape that does not fit config.json "
                             f"({name} would be {tuple(params[name].shape)}, expected "
                             f"{shapes[name]})")
    if tensors:
        raise ValueError(f"{path}: unexpected {sorted(tensors)[0]} (not in a T5 of config.json)")
    return params


def save_checkpoint(directory, params: dict, config: T5Config, tokenizer=None) -> None:
    """Writes params (ringpipe names -> host arrays) and config, atomically (see gpt2's)."""
    with staged_directory(directory, merge=True) as stage:
        write_checkpoint_files(stage, params, config, tokenizer)


def weights_metadata(config) -> dict:
    """The safetensors metadata of model.safetensors (besides the checksums): the format transformers expects."""
    return {"format": "pt"}


def write_checkpoint_files(directory, params: dict, config: T5Config, tokenizer=None) -> None:
    save_tensors(os.path.join(directory, WEIGHTS_FILE), to_transformers(params, config),
                 metadata=weights_metadata(config))
    write_json(os.path.join(directory, CONFIG_FILE), hf_config(config), indent=2)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_checkpoint(directory, dtype=None, device=None) -> tuple[T5Config, dict]:
    """-> (T5Config, params as host arrays with ringpipe names). dtype defaults to the stored."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    hf = read_config_json(config_path)
    if hf.get("model_type", "t5") != "t5":
        raise ValueError(f"{config_path}: model_type {hf['model_type']!r} is not a T5 checkpoint")
    config = t5_config_from_hf(hf, config_path, dtype="float64", device=device or "cpu")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"checkpoint weights not found: {weights_path}")
    tensors, _ = load_tensors(weights_path)
    stored = str(next(iter(tensors.values())).dtype) if tensors else "float32"
    params = from_transformers(tensors, config, weights_path)
    config.dtype = dtype or (stored if stored in DTYPES else "float32")
    T5Config(**config.to_dict())  # validates the dtype
    return config, params

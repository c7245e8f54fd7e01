"""Checkpoints in Hugging Face GPT-2 format: `model.safetensors` + `config.json`.

Written with transformers' key style (`transformer.h.0.attn.c_attn.weight`, LM head tied to
`transformer.wte.weight` and not stored), so `GPT2LMHeadModel.from_pretrained(dir)` opens it.
Read back from either key style, with or without a stored `lm_head.weight`. Writes are atomic:
files are built beside their destination and moved into place with os.replace.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "transformer."
# Buffers some transformers versions store: the causal mask, not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def hf_config(config) -> dict:
    """The config.json transformers' GPT2Config reads, plus ringpipe's own config."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.n_inner,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": config.dtype,
        "dtype": config.dtype,
        "ringpipe": config.to_dict(),
    }


def save_checkpoint(directory, params: dict, config, tokenizer=None) -> None:
    """Writes params (GPT-2 names -> host arrays, saved in their own dtype) and config.

    A directory that does not exist (or is empty) appears complete in one rename; into a
    non-empty one each file is replaced atomically.
    """
    from safetensors.numpy import save_file

    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        tensors = {PREFIX + name: np.ascontiguousarray(array) for name, array in params.items()}
        save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(staging, CONFIG_FILE), "w") as f:
            json.dump(hf_config(config), f, indent=2)
        if tokenizer is not None:
            tokenizer.save(staging)
        if not os.path.isdir(directory) or not os.listdir(directory):
            os.replace(staging, directory)
            return
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_config(path) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint config not found: {path}")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_weights(path) -> dict:
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def _ringpipe_names(tensors: dict, path) -> dict:
    """transformers or ringpipe keys -> ringpipe names; the tied lm_head folds into wte."""
    params = {}
    lm_head = tensors.pop("lm_head.weight", None)
    for key, array in tensors.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        params[key[len(PREFIX):] if key.startswith(PREFIX) else key] = array
    if lm_head is not None:
        if "wte.weight" not in params:
            params["wte.weight"] = lm_head
        elif not np.array_equal(lm_head, params["wte.weight"]):
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight; "
                             "ringpipe's GPT-2 ties them")
    return params


def load_checkpoint(directory, dtype=None, device=None):
    """-> (GPTConfig, params as host arrays). dtype defaults to the stored dtype."""
    from model.gpt import DTYPES, param_shapes
    from model.gpt2_hf_config import gpt_config_from_hf, refuse_unsupported

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    hf = _read_config(config_path)
    refuse_unsupported(hf, config_path)
    params = _ringpipe_names(_read_weights(weights_path), weights_path)
    stored = str(params["wte.weight"].dtype) if "wte.weight" in params else "float32"
    ours = hf.get("ringpipe", {})
    config = gpt_config_from_hf(hf, config_path,
                                dtype=dtype or (stored if stored in DTYPES else "float32"),
                                device=device or "cpu",
                                recompute=bool(ours.get("recompute", False)))
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise ValueError(f"{weights_path}: parameters do not match config.json "
                         f"(missing {missing[:3]}, unexpected {unknown[:3]})")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(params[name].shape)}, "
                             f"config.json implies {shape}")
    return config, params

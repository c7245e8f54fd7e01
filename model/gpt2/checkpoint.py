"""Checkpoints in Hugging Face GPT-2 format: `model.safetensors` + `config.json`.

Written with transformers' key style (`transformer.h.0.attn.c_attn.weight`, LM head tied to
`transformer.wte.weight` and not stored), so `GPT2LMHeadModel.from_pretrained(dir)` opens it.
Read back from either key style, with or without a stored `lm_head.weight`. Writes are atomic
(`runtime.files`); each tensor's checksum and the model's dimensions are stored in the
safetensors metadata and checked on load.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ringpipe.model.gpt2.config import DTYPES, param_shapes
from ringpipe.model.gpt2.hf_config import gpt_config_from_hf, refuse_unsupported
from ringpipe.runtime.files import load_tensors, save_tensors, staged_directory, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "transformer."
# Buffers some transformers versions store: the causal mask, not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The weights file records the model's dimensions (safetensors metadata), so a config.json edited
# or mismatched afterwards is refused rather than silently reinterpreting the weights.
RECORD_KEY = "ringpipe.model"
# The model options recorded beside the weights (model.gpt2.config.ARCHITECTURE_FIELDS) and their
# config.json names.
HF_NAMES = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
            "vocab_size": "vocab_size", "n_inner": "n_inner", "layer_norm_epsilon": "layer_norm_epsilon",
            "scale_attn_weights": "scale_attn_weights",
            "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx"}
RECORDED = tuple(HF_NAMES)


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


def weights_metadata(config) -> dict:
    """The safetensors metadata of model.safetensors (besides the checksums): the format transformers
    expects, and the model's dimensions (RECORD_KEY)."""
    return {"format": "pt", RECORD_KEY: json.dumps({key: getattr(config, key) for key in RECORDED},
                                                   separators=(",", ":"))}


def save_checkpoint(directory, params: dict, config, tokenizer=None) -> None:
    """Writes params (GPT-2 names -> host arrays, saved in their own dtype) and config.

    A directory that does not exist (or is empty) appears complete in one rename; into a
    non-empty one each file is replaced atomically. FileWriteError (path and cause) if a file
    cannot be written; nothing temporary is left behind.
    """
    with staged_directory(directory, merge=True) as stage:
        write_checkpoint_files(stage, params, config, tokenizer)


def write_checkpoint_files(directory, params: dict, config, tokenizer=None) -> None:
    """model.safetensors (with per-tensor checksums and the model's shape record in its metadata),
    config.json and the tokenizer, into an existing (staging) directory."""
    tensors = {PREFIX + name: array for name, array in params.items()}
    save_tensors(os.path.join(directory, WEIGHTS_FILE), tensors, metadata=weights_metadata(config))
    write_json(os.path.join(directory, CONFIG_FILE), hf_config(config), indent=2)
    if tokenizer is not None:
        tokenizer.save(directory)


def read_config_json(path) -> dict:
    """A checkpoint's config.json as a dict; FileNotFoundError or a ValueError naming the file."""
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


def _read_weights(path) -> tuple[dict, dict]:
    """-> (tensors, metadata); checksums verified where the file has them."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    return load_tensors(path)


def _check_record(hf: dict, metadata: dict, config_path: str, weights_path: str) -> None:
    """config.json must agree with ringpipe's own record: its "ringpipe" section and the dimensions
    stored beside the weights (both absent in checkpoints written by transformers)."""
    records = [("its own \"ringpipe\" section", hf.get("ringpipe") or {})]
    if RECORD_KEY in metadata:
        try:
            records.append((f"the record in {weights_path}", json.loads(metadata[RECORD_KEY])))
        except ValueError:
            raise ValueError(f"{weights_path}: metadata {RECORD_KEY} is not valid JSON") from None
    for source, record in records:
        for key, hf_name in HF_NAMES.items():
            if key in record and hf_name in hf and record[key] != hf[hf_name]:
                raise ValueError(f"{config_path}: {hf_name} {hf[hf_name]!r} contradicts {source} "
                                 f"({key} {record[key]!r}); refusing to load a mismatched checkpoint")


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
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    hf = read_config_json(config_path)
    refuse_unsupported(hf, config_path)
    tensors, metadata = _read_weights(weights_path)
    _check_record(hf, metadata, config_path, weights_path)
    params = _ringpipe_names(tensors, weights_path)
    stored = str(params["wte.weight"].dtype) if "wte.weight" in params else "float32"
    ours = hf.get("ringpipe", {})
    config = gpt_config_from_hf(hf, config_path,
                                dtype=dtype or (stored if stored in DTYPES else "float32"),
                                device=device or "cpu",
                                recompute=bool(ours.get("recompute", False)))
    check_param_shapes(params, param_shapes(config), weights_path)
    return config, params


def check_param_shapes(params: dict, expected: dict, weights_path: str) -> None:
    """ValueError naming the weights file unless `params` has exactly the names of `expected`
    ({name: shape}, what config.json implies), each with its shape."""
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise ValueError(f"{weights_path}: parameters do not match config.json "
                         f"(missing {missing[:3]}, unexpected {unknown[:3]})")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(params[name].shape)}, "
                             f"config.json implies {shape}")

"""BERT checkpoints in Hugging Face's format: `model.safetensors` + `config.json`, of a
BertForMaskedLM, or of a BertForPreTraining when the model has the next-sentence head.

Written with transformers' keys (`bert.encoder.layer.0.attention.self.query.weight`, linear weights
(out, in), the decoder tied to the word embeddings and not stored), so `from_pretrained(dir)` of
that class opens it with no missing or unexpected key. Read back from those keys, with or without a
stored decoder (it must equal what it is tied to); a file with `cls.seq_relationship` gives a model
with the next-sentence head, and a pooler without that head (no part of the MLM logits) is skipped.
Writes are atomic (runtime.files), each tensor's checksum checked on load.
"""
from __future__ import annotations

import os

import numpy as np

from ringpipe.model.bert.config import DTYPES, WORD_EMBEDDINGS, BertConfig, param_shapes
from ringpipe.model.bert.hf_config import bert_config_from_hf, hf_config, refuse_unsupported
from ringpipe.model.families import hf_part
from ringpipe.model.gpt2.checkpoint import check_param_shapes, read_config_json
from ringpipe.runtime.files import load_tensors, save_tensors, staged_directory, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "bert."
QKV = ("query", "key", "value")
# Linear weights: ringpipe (in, out) is transformers' (out, in) transposed.
_TRANSPOSED = ("attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight",
               "cls.predictions.transform.dense.weight", "pooler.dense.weight", "cls.seq_relationship.weight")
# Buffers stored by some transformers versions: no parameters.
_SKIPPED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
NEXT_SENTENCE_KEY = "cls.seq_relationship.weight"


def hf_layout(shapes: dict) -> list[tuple]:
    """Where each transformers tensor lies in ringpipe's parameters of `shapes` ({name: shape}, in
    order): [(key, name, columns or None, transposed)] (model/families.py's `hf_tensors`)."""
    layout = []
    for name, shape in shapes.items():
        if ".attention.qkv." in name:  # fused (in, 3C) and (3C,): query | key | value
            stem, kind = name.replace(".attention.qkv.", ".attention.self."), name.rsplit(".", 1)[1]
            width = shape[-1] // 3
            layout += [(PREFIX + stem.replace(".self." + kind, f".self.{part}.{kind}"), name,
                        slice(j * width, (j + 1) * width), kind == "weight") for j, part in enumerate(QKV)]
        else:
            layout.append((name if name.startswith("cls.") else PREFIX + name, name, None, name.endswith(_TRANSPOSED)))
    return layout


def hf_tensors(config: BertConfig) -> list[tuple]:
    return hf_layout(param_shapes(config))


def to_hf(params: dict) -> dict:
    """ringpipe names and layouts -> transformers' keys and layouts (host arrays)."""
    return {key: hf_part(np.asarray(params[name]), columns, transposed)
            for key, name, columns, transposed in hf_layout({name: np.shape(p) for name, p in params.items()})}


def from_hf(tensors: dict, path: str) -> dict:
    """transformers' keys -> ringpipe names and layouts; the tied decoder folds into what it is tied to."""
    decoder = {key: tensors.pop(key) for key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
               if key in tensors}
    params, pieces = {}, {}
    skipped = _SKIPPED if NEXT_SENTENCE_KEY in tensors else (*_SKIPPED, "bert.pooler.")
    for key, array in tensors.items():
        if key.startswith(skipped):
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".attention.self." in name:
            stem, part, kind = name.rsplit(".", 2)
            pieces.setdefault((stem.replace(".self", ".qkv") + "." + kind, kind), {})[part] = array
            continue
        params[name] = np.ascontiguousarray(array.T) if name.endswith(_TRANSPOSED) else array
    for (name, kind), parts in pieces.items():
        if set(parts) != set(QKV):
            raise ValueError(f"{path}: {name} lacks {sorted(set(QKV) - set(parts))} of query/key/value")
        params[name] = np.concatenate([parts[p].T if kind == "weight" else parts[p] for p in QKV], axis=-1)
    for key, tied in (("cls.predictions.decoder.weight", WORD_EMBEDDINGS),
                      ("cls.predictions.decoder.bias", "cls.predictions.bias")):
        if key in decoder and tied in params and not np.array_equal(decoder[key], params[tied]):
            raise ValueError(f"{path}: {key} differs from {tied}; ringpipe's BERT ties them")
        if key in decoder and tied not in params:
            params[tied] = decoder[key]
    return params


def weights_metadata(config) -> dict:
    """The safetensors metadata of model.safetensors (besides the checksums): the format transformers expects."""
    return {"format": "pt"}


def write_checkpoint_files(directory, params: dict, config: BertConfig, tokenizer=None) -> None:
    """model.safetensors (transformers' keys, per-tensor checksums), config.json and the
    tokenizer, into an existing (staging) directory."""
    save_tensors(os.path.join(directory, WEIGHTS_FILE), to_hf(params), metadata=weights_metadata(config))
    write_json(os.path.join(directory, CONFIG_FILE), hf_config(config), indent=2)
    if tokenizer is not None:
        tokenizer.save(directory)


def save_checkpoint(directory, params: dict, config: BertConfig, tokenizer=None) -> None:
    """Writes params and config atomically (as model/gpt2/checkpoint.py's save_checkpoint)."""
    with staged_directory(directory, merge=True) as stage:
        write_checkpoint_files(stage, params, config, tokenizer)


def load_checkpoint(directory, dtype=None, device=None):
    """-> (BertConfig, params as host arrays); dtype defaults to the stored one. ValueError naming
    the file for a refused config key or weights that do not match config.json."""
    directory = os.fspath(directory)
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
    hf = read_config_json(config_path)
    refuse_unsupported(hf, config_path)
    tensors, _ = load_tensors(weights_path)
    params = from_hf(tensors, weights_path)
    stored = str(params[WORD_EMBEDDINGS].dtype) if WORD_EMBEDDINGS in params else "float32"
    config = bert_config_from_hf(hf, config_path, dtype=dtype or (stored if stored in DTYPES else "float32"),
                                 device=device or "cpu", next_sentence=NEXT_SENTENCE_KEY in params)
    check_param_shapes(params, param_shapes(config), weights_path)
    return config, params

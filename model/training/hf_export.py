"""The Hugging Face model files (`model.safetensors`, `config.json`, tokenizer) of a checkpoint,
built from a sharded checkpoint by streaming: no process ever holds a whole tensor.

The safetensors header is written from the checkpoint's metadata (names, dtypes, shapes), then each
tensor's bytes follow in row-major order, gathered from the tensor-parallel pieces in chunks of
EXPORT_CHUNK_BYTES (16 MiB); the CRC-32 of each tensor is computed on the way and written into the
header last (its text has a fixed length). The file is the one the single-process Trainer writes
for the same weights (model/gpt2/checkpoint.py), byte for byte.
"""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.gpt2.checkpoint import (CONFIG_FILE, PREFIX, RECORD_KEY, RECORDED, WEIGHTS_FILE, hf_config,
                                            load_checkpoint, save_checkpoint)
from ringpipe.model.gpt2.config import GPTConfig, param_shapes
from ringpipe.model.training.checkpoint_metadata import check_checkpoint, is_sharded, read_metadata, tensor_name
from ringpipe.model.training.checkpoint_pieces import flat_range_boxes
from ringpipe.model.training.sharded_checkpoint import read_box
from ringpipe.runtime.files import CHECKSUMS_KEY, SAFETENSORS_DTYPES, atomic_write, staged_directory, write_json

# At most 32 MiB of a tensor at a time; 16 because the pieces' mapped pages count in the resident
# set beside the chunk's buffer while it is filled (2 × 16 MiB at the peak).
EXPORT_CHUNK_BYTES = 16 << 20
_NO_CHECKSUM = "crc32:00000000"  # a placeholder as long as any checksum


def _header(names: list, entries: list, metadata: dict, checksums: dict) -> bytes:
    header, offset = {"__metadata__": {**metadata, CHECKSUMS_KEY: json.dumps(checksums, separators=(",", ":"))}}, 0
    for name, entry in zip(names, entries):
        nbytes = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[entry["dtype"]], "shape": list(entry["shape"]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned


def stream_tensors(path: str, checkpoint: str, tensors: dict, metadata: dict | None = None,
                   chunk_bytes: int = EXPORT_CHUNK_BYTES) -> None:
    """Write a safetensors file at `path` (atomically) holding {output name: global tensor name of
    the sharded checkpoint}, in that order, with a CRC-32 per tensor in its metadata as
    runtime.files.save_tensors writes them. Reads at most `chunk_bytes` of a tensor at a time."""
    entries = read_metadata(checkpoint)["tensors"]
    names, chosen = list(tensors), [entries[tensors[name]] for name in tensors]
    metadata = dict(metadata or {})
    placeholder = _header(names, chosen, metadata, {name: _NO_CHECKSUM for name in names})
    checksums, verified = {}, set()
    with atomic_write(path) as f:
        f.write(len(placeholder).to_bytes(8, "little"))
        f.write(placeholder)
        for name, entry in zip(names, chosen):
            shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
            per_chunk, total, crc = max(1, chunk_bytes // dtype.itemsize), int(np.prod(shape, dtype=np.int64)), 0
            for start in range(0, total, per_chunk):
                for box in flat_range_boxes(shape, start, min(start + per_chunk, total)):
                    block = np.empty(box[1], dtype)
                    read_box(checkpoint, tensors[name], entry, box, block, verified)
                    data = block.reshape(-1).view(np.uint8)
                    crc = zlib.crc32(data, crc)
                    f.write(data)
                    del block, data
            checksums[name] = f"crc32:{crc & 0xFFFFFFFF:08x}"
        header = _header(names, chosen, metadata, checksums)
        assert len(header) == len(placeholder)  # fixed-length checksums: the data does not move
        f.seek(8)
        f.write(header)


def export_model(checkpoint: str, out: str, chunk_bytes: int = EXPORT_CHUNK_BYTES) -> None:
    """model.safetensors, config.json and the tokenizer files of a sharded checkpoint, into `out`
    (created if needed; files there are replaced one by one, atomically)."""
    metadata = read_metadata(checkpoint)
    config = GPTConfig(**metadata["model"])
    tensors = {PREFIX + name: tensor_name(PREFIX + name, "weight") for name in param_shapes(config)}
    check_checkpoint(checkpoint, metadata, {tensors[PREFIX + name]: shape for name, shape in param_shapes(config).items()})
    record = json.dumps({key: getattr(config, key) for key in RECORDED}, separators=(",", ":"))
    with staged_directory(out, merge=True) as stage:
        stream_tensors(os.path.join(stage, WEIGHTS_FILE), checkpoint, tensors,
                       {"format": "pt", RECORD_KEY: record}, chunk_bytes)
        write_json(os.path.join(stage, CONFIG_FILE), hf_config(config), indent=2)
        load_tokenizer(checkpoint).save(stage)


def export_checkpoint(checkpoint: str, out: str) -> None:
    """The Hugging Face files of any checkpoint: streamed from a sharded one; a consolidated one
    (model/training/trainer.py) is small enough to have been written whole, and is loaded whole."""
    if is_sharded(checkpoint):
        export_model(checkpoint, out)
        return
    config, params = load_checkpoint(checkpoint)
    # in the model's order, as the Trainer writes them (the reader returns them sorted by name)
    save_checkpoint(out, {name: params[name] for name in param_shapes(config)}, config, load_tokenizer(checkpoint))

"""The Hugging Face model files (`model.safetensors`, `config.json`, tokenizer) of a checkpoint,
built from a sharded checkpoint by streaming: no process ever holds a whole tensor.

The safetensors header is written from the checkpoint's metadata (names, dtypes, shapes), then each
tensor's bytes follow in row-major order, gathered from the tensor-parallel pieces in chunks of
EXPORT_CHUNK_BYTES (1 MiB); the CRC-32 of each tensor is computed on the way and written into the
header last (its text has a fixed length). A family whose Hugging Face tensors are not its
parameters as they are (BERT's and T5's fused q|k|v, weights stored transposed) says where each lies
(`Family.hf_tensors`: a column range of a parameter, maybe transposed); such a tensor is read a block
of whole columns at a time and transposed on the way. The file is the one the single-process
Trainer writes for the same weights (the family's checkpoint.py), byte for byte.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.families import CONFIG_FILE, family
from ringpipe.model.training.checkpoint_metadata import check_checkpoint, is_sharded, read_metadata, tensor_name
from ringpipe.model.training.checkpoint_pieces import flat_range_boxes
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import read_trainer_state
from ringpipe.model.training.sharded_checkpoint import (family_of, hf_name, load_consolidated, parameter_names,
                                                        read_box)
from ringpipe.runtime.files import atomic_write, safetensors_header, staged_directory, write_json

WEIGHTS_FILE = "model.safetensors"  # Hugging Face's name, whatever the family
# A tensor is gathered 1 MiB at a time (32 MiB would be allowed): as fast here (a 256 MiB tensor in
# 3.9 s against 4.3 s with 16 MiB), and the driver's peak RSS stays +4 MiB instead of +27 MiB (the
# pieces' mapped pages count beside the chunk's buffer while it is filled).
EXPORT_CHUNK_BYTES = 1 << 20
_NO_CHECKSUM = "crc32:00000000"  # a placeholder as long as any checksum


def _header(names: list, entries: list, metadata: dict, checksums: dict) -> bytes:
    return safetensors_header([(name, entry["dtype"], entry["shape"],
                                int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize)
                               for name, entry in zip(names, entries)], metadata, checksums)


def _view(entry: dict, columns: slice | None, transposed: bool) -> dict:
    """The entry (shape, dtype) of a stored tensor's `columns` (last axis), maybe transposed."""
    shape = list(entry["shape"])
    if columns is not None:
        shape[-1] = len(range(shape[-1])[columns])
    return {"shape": shape[::-1] if transposed else shape, "dtype": entry["dtype"]}


def _blocks(checkpoint: str, source: str, entry: dict, columns: slice | None, transposed: bool, chunk_bytes: int,
            verified: set):
    """The tensor (`source`'s `columns`, maybe transposed) in row-major order, as blocks of at most
    about `chunk_bytes` (one row or column at least)."""
    shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
    per_chunk = max(1, chunk_bytes // dtype.itemsize)
    if columns is None and not transposed:
        total = int(np.prod(shape, dtype=np.int64))
        for start in range(0, total, per_chunk):
            for box in flat_range_boxes(shape, start, min(start + per_chunk, total)):
                yield _read(checkpoint, source, entry, box, verified)
        return
    width = range(shape[-1])[columns or slice(None)]
    if len(shape) == 1:  # a range of a vector
        for start in range(0, len(width), per_chunk):
            stop = min(start + per_chunk, len(width))
            yield _read(checkpoint, source, entry, ((width.start + start,), (stop - start,)), verified)
        return
    rows = shape[0]
    if transposed:  # the output's rows are the stored tensor's columns: a block of whole columns at a time
        step = max(1, per_chunk // rows)
        for start in range(0, len(width), step):
            count = min(step, len(width) - start)
            yield _read(checkpoint, source, entry, ((0, width.start + start), (rows, count)), verified).T
    else:
        step = max(1, per_chunk // len(width))
        for start in range(0, rows, step):
            count = min(step, rows - start)
            yield _read(checkpoint, source, entry, ((start, width.start), (count, len(width))), verified)


def _read(checkpoint: str, source: str, entry: dict, box, verified: set):
    block = np.empty(box[1], np.dtype(entry["dtype"]))
    read_box(checkpoint, source, entry, box, block, verified)
    return block


def stream_tensors(path: str, checkpoint: str, tensors: dict, metadata: dict | None = None,
                   chunk_bytes: int = EXPORT_CHUNK_BYTES) -> None:
    """Write a safetensors file at `path` (atomically) holding {output name: global tensor name of
    the sharded checkpoint, or (global name, columns: a slice of its last axis or None, transposed)},
    in that order, with a CRC-32 per tensor in its metadata as runtime.files.save_tensors writes
    them. Reads at most about `chunk_bytes` of a tensor at a time (a whole row or column at least)."""
    entries = read_metadata(checkpoint)["tensors"]
    views = {name: (view, None, False) if isinstance(view, str) else tuple(view) for name, view in tensors.items()}
    names = list(views)
    chosen = [_view(entries[source], columns, transposed) for source, columns, transposed in views.values()]
    metadata = dict(metadata or {})
    placeholder = _header(names, chosen, metadata, {name: _NO_CHECKSUM for name in names})
    checksums, verified = {}, set()
    with atomic_write(path) as f:
        f.write(len(placeholder).to_bytes(8, "little"))
        f.write(placeholder)
        for name, (source, columns, transposed) in views.items():
            crc = 0
            for block in _blocks(checkpoint, source, entries[source], columns, transposed, chunk_bytes, verified):
                data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
                crc = zlib.crc32(data, crc)
                f.write(data)
                del block, data
            checksums[name] = f"crc32:{crc & 0xFFFFFFFF:08x}"
        header = _header(names, chosen, metadata, checksums)
        assert len(header) == len(placeholder)  # fixed-length checksums: the data does not move
        f.seek(8)
        f.write(header)


def export_model(checkpoint: str, out: str, chunk_bytes: int = EXPORT_CHUNK_BYTES, records: dict | None = None) -> None:
    """model.safetensors, config.json and the tokenizer files of a sharded checkpoint, into `out`
    (created if needed; files there are replaced one by one, atomically). Streamed when the model
    family describes its files (`hf_config`, `weights_metadata`); otherwise loaded whole and written
    by the family. `records`: {file name: JSON object} written beside them, in the same swap."""
    metadata = read_metadata(checkpoint)
    model_family = family_of(metadata)
    config = model_family.config(**metadata["model"])
    # The model record must be the run's: its architecture fields decide what the weights mean.
    run = TrainConfig(**metadata["config"]).model_config(config.vocab_size)
    check_checkpoint(checkpoint, metadata, model={key: getattr(run, key) for key in model_family.architecture_fields},
                     whose="its run's config")
    plan = model_family.parallel_plan(config)
    layout = (model_family.hf_tensors(config) if model_family.hf_tensors is not None else
              [(hf_name(plan, name), name, None, False) for name in parameter_names(plan)])
    weights = {key: (tensor_name(hf_name(plan, name), "weight"), columns, transposed)
               for key, name, columns, transposed in layout}
    check_checkpoint(checkpoint, metadata, sorted({source for source, _, _ in weights.values()}))
    tokenizer = load_tokenizer(checkpoint)
    with staged_directory(out, merge=True) as stage:
        _write_records(stage, records)
        if model_family.hf_config is None or model_family.weights_metadata is None:
            _, params, _ = load_consolidated(checkpoint)
            model_family.write_checkpoint_files(stage, {name: params[name] for name in parameter_names(plan)},
                                                config, tokenizer)
            return
        stream_tensors(os.path.join(stage, WEIGHTS_FILE), checkpoint, weights, model_family.weights_metadata(config),
                       chunk_bytes)
        write_json(os.path.join(stage, CONFIG_FILE), model_family.hf_config(config), indent=2)
        tokenizer.save(stage)


def export_checkpoint(checkpoint: str, out: str, records: dict | None = None) -> None:
    """The Hugging Face files of any checkpoint: streamed from a sharded one; a consolidated one
    (model/training/trainer.py) is small enough to have been written whole, and is loaded whole.
    `records`: {file name: JSON object} written beside them, in the same swap (an export's origin)."""
    if is_sharded(checkpoint):
        export_model(checkpoint, out, records=records)
        return
    model_family = family(read_trainer_state(checkpoint)["config"].family)
    config, params = model_family.load_checkpoint(checkpoint)
    plan = model_family.parallel_plan(config)
    # in the model's order, as the Trainer writes them (the reader returns them sorted by name)
    with staged_directory(out, merge=True) as stage:
        _write_records(stage, records)
        model_family.write_checkpoint_files(stage, {name: params[name] for name in parameter_names(plan)}, config,
                                            load_tokenizer(checkpoint))


def _write_records(stage: str, records: dict | None) -> None:
    for name, record in (records or {}).items():
        write_json(os.path.join(stage, name), record, indent=1)

"""A sharded checkpoint's metadata (its COMMIT_FILE, `checkpoint.json`): what it is, checking it,
writing it last, and the life of checkpoint directories (unfinished ones removed, old ones pruned).

    {"format": "ringpipe.sharded-checkpoint", "version": 1, "step": 40,
     "config": {TrainConfig}, "model": {GPTConfig of the stored weights}, "layout": {Layout saved from},
     "optimizer": {"step": 40, ...scalars such as a mixed run's loss scale},
     "tensors": {"transformer.h.0.attn.c_attn.weight": {
         "param": "h.0.attn.c_attn.weight", "role": "weight" | "exp_avg" | "exp_avg_sq",
         "shape": [16, 48], "dtype": "float64",
         "pieces": [{"file": "rank-00001.safetensors", "key": "...", "offsets": [0, 8], "lengths": [16, 8],
                     "byte_offset": 1234, "nbytes": 1024, "crc32": "crc32:89abcdef"}, ...]}, ...}}

Adam moments are the tensors "optimizer.exp_avg.NAME" and "optimizer.exp_avg_sq.NAME" (PyTorch's
names for them). Each piece is a box of the global tensor (model/training/checkpoint_pieces.py)
stored whole as one tensor of a rank's safetensors file. Every error names the tensor and the file.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ringpipe.model.training.checkpoint_pieces import intersect, volume
from ringpipe.model.training.run_dir import COMMIT_FILE, sharded_checkpoints
from ringpipe.runtime.files import SAFETENSORS_DTYPES, make_directory, write_json

FORMAT = "ringpipe.sharded-checkpoint"
VERSION = 1
ROLES = {"weight": "", "exp_avg": "optimizer.exp_avg.", "exp_avg_sq": "optimizer.exp_avg_sq."}


def tensor_name(hf_name: str, role: str) -> str:
    """The global name of a parameter's weight or Adam moment."""
    return ROLES[role] + hf_name


def is_sharded(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, COMMIT_FILE))


def read_metadata(checkpoint: str) -> dict:
    """The checkpoint's metadata; ValueError naming the file if it is missing or not ours."""
    path = os.path.join(checkpoint, COMMIT_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"corrupt checkpoint file {path}: {exc}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"corrupt checkpoint file {path}: not a {FORMAT} file")
    if metadata.get("version") != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {metadata.get('version')!r}; this ringpipe reads "
                         f"version {VERSION}")
    return metadata


# ---- checking -------------------------------------------------------------------------------------
def _file_header(path: str, cache: dict) -> dict:
    """The safetensors header of a piece file (cached); ValueError naming the file."""
    if path not in cache:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                length = int.from_bytes(f.read(8), "little")
                if size < 8 or 8 + length > size:
                    raise ValueError(f"truncated: {size} bytes, the header alone needs "
                                     f"{8 + length if size >= 8 else 8}")
                header = json.loads(f.read(length))
                if not isinstance(header, dict):
                    raise ValueError("its header is not a JSON object")
                cache[path] = (header, 8 + length, size)
        except (OSError, ValueError) as exc:
            raise ValueError(f"checkpoint piece file {path} cannot be read ({exc})") from None
    return cache[path]


def check_tensor(checkpoint: str, name: str, entry: dict, headers: dict | None = None) -> None:
    """ValueError (naming the tensor and the file) unless the pieces of `entry` exist, have the
    size and dtype they should, and cover its shape exactly once."""
    headers = {} if headers is None else headers
    shape, dtype = tuple(entry["shape"]), entry["dtype"]
    where = f"tensor {name} of checkpoint {checkpoint}"
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r} in {os.path.join(checkpoint, COMMIT_FILE)}")
    boxes, covered = [], 0
    for piece in entry["pieces"]:
        path = os.path.join(checkpoint, piece["file"])
        box = (tuple(piece["offsets"]), tuple(piece["lengths"]))
        if len(box[0]) != len(shape) or any(o < 0 or n < 1 or o + n > s for o, n, s in zip(*box, shape)):
            raise ValueError(f"tensor {name}: piece {piece['key']!r} in {path} at offsets {list(box[0])} "
                             f"lengths {list(box[1])} lies outside the shape {list(shape)}")
        if not os.path.isfile(path):
            raise ValueError(f"tensor {name}: piece file {path} is missing")
        header, data_start, size = _file_header(path, headers)
        stored = header.get(piece["key"])
        expected = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(box[1])}
        nbytes = volume(box[1]) * np.dtype(dtype).itemsize
        if stored is None:
            raise ValueError(f"tensor {name}: piece {piece['key']!r} is missing from {path}")
        if stored.get("dtype") != expected["dtype"] or stored.get("shape") != expected["shape"]:
            raise ValueError(f"tensor {name}: piece {piece['key']!r} in {path} is {stored.get('dtype')} "
                             f"{stored.get('shape')}, the metadata says {expected['dtype']} {expected['shape']}")
        begin, end = stored["data_offsets"]
        if data_start + end > size:  # each fault its own words: a cut file is not a wrong size
            raise ValueError(f"tensor {name}: {path} is truncated: piece {piece['key']!r} ends at byte "
                             f"{data_start + end}, the file has {size} bytes")
        if piece["nbytes"] != nbytes or end - begin != nbytes:
            raise ValueError(f"tensor {name}: piece {piece['key']!r} in {path} has the wrong size "
                             f"({end - begin} bytes stored, {nbytes} expected)")
        if piece["byte_offset"] != data_start + begin:
            raise ValueError(f"tensor {name}: piece {piece['key']!r} in {path} starts at byte "
                             f"{data_start + begin}, the metadata says {piece['byte_offset']}")
        for other in boxes:
            if intersect(box, other) is not None:
                raise ValueError(f"tensor {name}: piece {piece['key']!r} in {path} overlaps another piece")
        boxes.append(box)
        covered += volume(box[1])
    if covered != volume(shape):
        raise ValueError(f"{where}: its pieces cover {covered} of its {volume(shape)} elements "
                         f"(shape {list(shape)}; see {os.path.join(checkpoint, COMMIT_FILE)})")


def check_checkpoint(checkpoint: str, metadata: dict, expected: dict | list = (), model: dict | None = None,
                     whose: str = "the run") -> None:
    """Everything but the checksums (which the readers verify): the model record against `model`
    (architecture fields of `whose` model config), every tensor of `expected` present (a list of
    global names, or {global name: shape} to check shapes too), and each tensor's pieces
    (`check_tensor`)."""
    path = os.path.join(checkpoint, COMMIT_FILE)
    for key, value in (model or {}).items():
        if metadata["model"].get(key) != value:
            raise ValueError(f"checkpoint {path} has {key} {metadata['model'].get(key)!r}, {whose} expects "
                             f"{value!r}")
    tensors = metadata["tensors"]
    for name in expected:
        if name not in tensors:
            raise ValueError(f"tensor {name} is missing from checkpoint {path}")
        if isinstance(expected, dict) and tuple(tensors[name]["shape"]) != tuple(expected[name]):
            raise ValueError(f"tensor {name} has shape {tensors[name]['shape']} in {path}, the model expects "
                             f"{list(expected[name])}")
    headers = {}
    for name, entry in tensors.items():
        check_tensor(checkpoint, name, entry, headers)


# ---- writing --------------------------------------------------------------------------------------
def commit(checkpoint: str, reports: list, *, step: int, config: dict, model: dict, layout: dict,
           optimizer: dict) -> None:
    """Join every rank's report of durable pieces into the metadata, check that they cover every
    tensor, and write COMMIT_FILE by atomic rename: the checkpoint exists from this moment on."""
    tensors = {}
    for report in reports:
        for piece in report["pieces"]:
            entry = tensors.setdefault(piece["tensor"], {key: piece[key] for key in ("param", "role", "shape",
                                                                                      "dtype")})
            entry.setdefault("pieces", []).append({key: piece[key] for key in (
                "file", "key", "offsets", "lengths", "byte_offset", "nbytes", "crc32")})
    metadata = {"format": FORMAT, "version": VERSION, "step": step, "config": config, "model": model,
                "layout": layout, "optimizer": optimizer, "tensors": dict(sorted(tensors.items()))}
    check_checkpoint(checkpoint, metadata)
    write_json(os.path.join(checkpoint, COMMIT_FILE), metadata, indent=1)


def new_checkpoint_directory(path: str) -> str:
    """An empty directory at `path` for a save in progress. What is there goes (an unfinished save;
    or a checkpoint of the same step from an earlier run, its commit file first)."""
    if os.path.isfile(os.path.join(path, COMMIT_FILE)):
        os.remove(os.path.join(path, COMMIT_FILE))
    shutil.rmtree(path, ignore_errors=True)
    make_directory(path)
    return path


def remove_unfinished(run_dir: str) -> list[str]:
    """Delete the sharded checkpoint directories that were never committed (a save that a crash
    or a killed rank interrupted); returns them. Called when a run starts, never during one."""
    removed = [path for _, path in sharded_checkpoints(run_dir, committed=False)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prune(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` committed sharded checkpoints (oldest first; the commit
    file goes first, so a crash midway leaves an unfinished directory, never a damaged checkpoint)."""
    committed = sharded_checkpoints(run_dir)
    old = [path for _, path in committed[:max(0, len(committed) - keep)]]
    for path in old:
        os.remove(os.path.join(path, COMMIT_FILE))
        shutil.rmtree(path, ignore_errors=True)
    return old

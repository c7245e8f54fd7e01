"""Where generation's weights come from, and reading only a rank's part of them.

`weights_source(directory)` (driver side, no weights read) finds what --checkpoint names
(`locate_weights`: the directory itself, or a run's newest checkpoint when it holds no final model):

    a sharded checkpoint    RUN/checkpoints/step-N; each rank reads from the pieces only the boxes
                            of its shards (checksummed pieces)
    a model directory       config.json + model.safetensors (a run's final model, a single-process
                            run's checkpoint, a transformers GPT-2); each rank reads the tensors of its
                            pipeline stages (each verified against its checksum) and keeps its shards

`read_rank_weights(source, holder)` (worker side) returns {name: this rank's shard} for every entry
of `holder.shard_table()`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from ringpipe.model.families import CONFIG_FILE, DEFAULT_FAMILY, checkpoint_family, family
from ringpipe.model.parallel.tensor_parallel.sharding import Sharding, shard
from ringpipe.model.quantization.gpt2_int8 import Int8GPT, int8_gpt_config, int8_rank_weights
from ringpipe.model.quantization.int8_format import quantization_config
from ringpipe.model.training.checkpoint_metadata import check_checkpoint, is_sharded, read_metadata
from ringpipe.model.training.run_dir import WEIGHTS_FILE, find_checkpoint
from ringpipe.model.training.sharded_checkpoint import family_of, load_consolidated, read_weights
from ringpipe.runtime.files import CHECKSUMS_KEY, CorruptFileError, tensor_checksum

# Families whose stage pieces have the cached forward (model/inference/kv_cache.py).
GENERATES_ACROSS_WORKERS = ("gpt2",)
SHARDED, MODEL = "sharded", "model"


def locate_weights(directory: str) -> str:
    """The directory holding the weights --checkpoint names: `directory` itself if it is a model
    directory (a run's final model included) or a sharded checkpoint, else the run's newest checkpoint;
    ValueError in one line if there is none."""
    if is_sharded(directory) or os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return directory
    return find_checkpoint(directory)


def load_whole_model(directory: str, device: str = "cpu"):
    """The dense model of the weights `directory` names (`locate_weights`), in one process."""
    path = locate_weights(directory)
    if quantization_config(path):  # an int8 model directory (ringpipe quantize)
        return Int8GPT.from_pretrained(path, device=device)
    if is_sharded(path):
        config, params, _ = load_consolidated(path)
        return family_of(read_metadata(path)).model(dataclasses.replace(config, device=device), params=params)
    return family(checkpoint_family(path) or DEFAULT_FAMILY).model.from_pretrained(path, device=device)


def weights_source(directory: str, device: str = "cpu") -> dict:
    """{"kind": SHARDED or MODEL, "path", "family", "model": the family's config as a dict} of the
    weights `directory` names (`locate_weights`); ValueError in one line if there are none, or if their
    family cannot generate across workers."""
    path = locate_weights(directory)
    sharded = is_sharded(path)
    if sharded:
        metadata = read_metadata(path)
        check_checkpoint(path, metadata)
        name = metadata["config"].get("family", DEFAULT_FAMILY)
    else:
        name = checkpoint_family(path) or DEFAULT_FAMILY
    if not hasattr(family(name).model, "generate"):
        raise ValueError(f"{path} holds a {name} model, which does not generate text")
    if name not in GENERATES_ACROSS_WORKERS:
        raise ValueError(f"generation across workers supports {', '.join(GENERATES_ACROSS_WORKERS)} models; "
                         f"{path} holds a {name} model (generate it in one process: leave out --nproc)")
    int8 = not sharded and quantization_config(path) is not None
    if sharded:
        model = dict(metadata["model"])
    else:
        model = dataclasses.asdict(int8_gpt_config(path)[0]) if int8 else _gpt2_config(path)
    model["device"] = device
    source = {"kind": SHARDED if sharded else MODEL, "path": path, "family": name, "model": model, "int8": int8}
    if not sharded and not int8:  # before any worker starts: the ranks check it again as they read
        check_model_tensors(os.path.join(path, WEIGHTS_FILE),
                            family(name).parallel_plan(model_config(source)).param_shapes())
    return source


def check_model_tensors(weights_path: str, shapes: dict) -> None:
    """ValueError naming the file unless its tensors (from its header; nothing else is read) are exactly
    the float parameters `shapes` ({name: shape}, what config.json implies) — as the single-process reader
    (model/gpt2/checkpoint.py) demands: an int8 file whose config.json lost its quantization_config has
    unexpected `..._scale` tensors and int8 weights."""
    from types import SimpleNamespace

    from ringpipe.model.gpt2.checkpoint import IGNORED_SUFFIXES, PREFIX, check_param_shapes

    header = _safetensors_header(weights_path)
    header.pop("__metadata__", None)
    tensors = {(key[len(PREFIX):] if key.startswith(PREFIX) else key): entry for key, entry in header.items()
               if not key.endswith(IGNORED_SUFFIXES) and key != "lm_head.weight"}
    if "lm_head.weight" in header and "wte.weight" not in tensors:
        tensors["wte.weight"] = header["lm_head.weight"]  # transformers' tied head
    check_param_shapes({name: SimpleNamespace(shape=tuple(entry.get("shape", ())))
                        for name, entry in tensors.items()}, shapes, weights_path)
    for name, entry in tensors.items():
        if entry.get("dtype") not in ("F16", "F32", "F64"):
            raise ValueError(f"{weights_path}: {name} is {entry.get('dtype')}, expected a float tensor "
                             "(F16, F32 or F64)")


def _gpt2_config(path: str) -> dict:
    """A GPT-2 model directory's config (config.json, and the weights' dtype from the file's header)."""
    from ringpipe.model.gpt2.checkpoint import PREFIX, read_config_json
    from ringpipe.model.gpt2.config import DTYPES
    from ringpipe.model.gpt2.hf_config import gpt_config_from_hf

    header = _safetensors_header(os.path.join(path, WEIGHTS_FILE))
    stored = {"F64": "float64", "F32": "float32", "F16": "float16"}.get(
        header.get(PREFIX + "wte.weight", header.get("wte.weight", {})).get("dtype"), "float32")
    config = gpt_config_from_hf(read_config_json(os.path.join(path, CONFIG_FILE)), os.path.join(path, CONFIG_FILE),
                                dtype=stored if stored in DTYPES else "float32")
    return dataclasses.asdict(config)


def _safetensors_header(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except FileNotFoundError:
        raise ValueError(f"checkpoint weights not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise CorruptFileError(path, f"not a readable safetensors file ({exc})") from None


def model_config(source: dict):
    """The source's model config (its family's dataclass)."""
    return family(source["family"]).config(**source["model"])


def read_rank_weights(source: dict, holder) -> dict:
    """{name: this rank's shard (a host array)} of every parameter in `holder.shard_table()`; `holder`
    also has the family's `plan` (its Hugging Face names)."""
    if source["kind"] == SHARDED:
        return read_weights(holder, source["path"])
    if source.get("int8"):  # int8 linears (Int8Weight shards cut like float ones), float for the rest
        return int8_rank_weights(source["path"], holder.shard_table())
    from safetensors import safe_open

    path = os.path.join(source["path"], WEIGHTS_FILE)
    check_model_tensors(path, holder.plan.param_shapes())
    table = holder.shard_table()
    weights = {}
    with safe_open(path, framework="numpy") as f:
        checksums = json.loads((f.metadata() or {}).get(CHECKSUMS_KEY, "{}"))
        keys = set(f.keys())
        for name, entry in table.items():
            key = next((k for k in (holder.plan.hf_name(name), name) if k in keys), None)
            if key is None and name == "wte.weight" and "lm_head.weight" in keys:
                key = "lm_head.weight"  # transformers' tied head, stored in place of the embedding
            if key is None:
                raise ValueError(f"{path}: tensor {holder.plan.hf_name(name)} is missing")
            full = f.get_tensor(key)
            if key in checksums and tensor_checksum(full) != checksums[key]:
                raise CorruptFileError(path, f"tensor {key} does not match its checksum {checksums[key]} "
                                             "(the file is damaged)")
            if tuple(full.shape) != tuple(entry["full_shape"]):
                raise ValueError(f"{path}: {key} has shape {tuple(full.shape)}, config.json implies "
                                 f"{tuple(entry['full_shape'])}")
            sharding = Sharding("replicated" if entry["axis"] is None else "column", entry["axis"], entry["parts"])
            weights[name] = np.asarray(shard(full, sharding, entry["tp_rank"], entry["tp_size"]))
            del full
    return weights

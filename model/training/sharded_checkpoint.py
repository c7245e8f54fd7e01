"""Sharded checkpoints: every rank writes only what it owns; the driver commits; any layout loads.

    RUN/checkpoints/step-00000040/rank-00003.safetensors   a rank's pieces (atomic write, CRC-32 each)
    RUN/checkpoints/step-00000040/config.json, tokenizer   written by the driver
    RUN/checkpoints/step-00000040/checkpoint.json          the metadata, renamed into place last

Saving (`save_sharded_checkpoint`, driver side, with `ParallelTrainer.save_checkpoint_pieces` on
every rank): each rank writes its tensor-parallel slices of the parameters of its pipeline stages
and their Adam moments. What data-parallel replicas hold alike is written once, spread over them
balanced by bytes (checkpoint_writers.py; parameters that tensor parallelism replicates too, over
dp × tp); a tied parameter by the stage that embeds. With ZeRO-1 every rank writes its
shard of the moments as it holds it, cut into boxes of the global tensors. Each rank reports its
pieces once they are fsynced; the driver checks they cover every tensor and renames the metadata
into place (checkpoint_metadata.py). Until then `find_checkpoint` does not see the directory, and
the next run's start removes it. The step, the seed and the config are the whole RNG and sampler
state (model/training/trainer.py), so a resume repeats an uninterrupted run bit for bit.

Loading (`load_rank`): a rank reads from each piece only the box it needs (a memory map), after
verifying the CRC-32 of the pieces it touches; `load_consolidated` assembles the full model for
the single-process Trainer.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib

import numpy as np

from ringpipe.model.families import CONFIG_FILE, DEFAULT_FAMILY, Family, family
from ringpipe.model.parallel.plan import stage_param_names
from ringpipe.model.training.checkpoint_metadata import (check_checkpoint, commit, is_sharded,
                                                         new_checkpoint_directory, prune, read_metadata,
                                                         tensor_name)
from ringpipe.model.training.checkpoint_pieces import (box_slices, flat_range_boxes, intersect, local_shape,
                                                       local_to_global, shard_boxes, volume)
from ringpipe.model.training.checkpoint_writers import WriterPlan, plan_writers, writes
from ringpipe.model.training.run_dir import step_directory
from ringpipe.model.training.step import NonFiniteError
from ringpipe.runtime.calls import RemoteError
from ringpipe.runtime.array_module import to_host
from ringpipe.runtime.files import CHECKSUMS_KEY, CorruptFileError, save_tensors, write_json

PIECE_FILE = "rank-{rank:05d}.safetensors"
READ_CHUNK_BYTES = 1 << 20  # checksums are computed over pieces read in chunks of this size


# ---- what a rank owns -------------------------------------------------------------------------------
def hf_name(plan, name: str) -> str:
    """A parameter's global name: its Hugging Face name where the family's plan gives one."""
    return plan.hf_name(name) if hasattr(plan, "hf_name") else name


def parameter_names(plan) -> list[str]:
    """Every parameter of the model a plan describes, in the model's order."""
    return stage_param_names(plan, range(plan.num_layers), True, True)


def family_of(metadata: dict) -> Family:
    return family(metadata["config"].get("family", DEFAULT_FAMILY))


def _piece(trainer, name: str, role: str, entry: dict, global_box, array) -> dict:
    tensor = tensor_name(hf_name(trainer.plan, name), role)
    offsets, lengths = global_box
    return {"tensor": tensor, "param": name, "role": role, "shape": list(entry["full_shape"]),
            "dtype": array.dtype.name, "offsets": list(offsets), "lengths": list(lengths),
            "key": f"{tensor}@{','.join(map(str, offsets))}", "array": array}  # a view: copied when written


def writer_plan(trainer, table: dict, weights: dict, names: list) -> WriterPlan:
    """Who writes each of `names` among the replicas that hold it alike, balanced by bytes
    (model/training/checkpoint_writers.py); the same plan on every rank of the stage's dp × tp block."""
    mesh = trainer.mesh
    tensors = [(name, volume(table[name]["full_shape"]) * weights[name].dtype.itemsize, table[name]["axis"] is None)
               for name in names]
    return plan_writers(tensors, mesh.dp_size, mesh.tp_size, bool(trainer.layout.zero))


def owned_pieces(trainer) -> list[dict]:
    """The pieces this rank of a `ParallelTrainer` writes: {"tensor", "param", "role", "shape",
    "dtype", "offsets", "lengths", "key", "array"}."""
    table, weights = trainer.shard_table(), trainer.local_params()
    tied, embeds = set(trainer.plan.tied_params), 0 in trainer.stages
    names = [name for name in sorted(weights) if embeds or name not in tied]
    zero = bool(trainer.layout.zero)
    plan, mesh = writer_plan(trainer, table, weights, names), trainer.mesh
    pieces = []
    for name in names:
        entry = table[name]
        if not writes(plan, name, mesh.dp_rank, mesh.tp_rank):
            continue
        arrays = {"weight": weights[name]}
        if not zero:
            arrays.update(exp_avg=to_host(trainer.optimizer.m[name]), exp_avg_sq=to_host(trainer.optimizer.v[name]))
        pairs = shard_boxes(entry["full_shape"], entry["axis"], entry["parts"], entry["tp_rank"], entry["tp_size"])
        for role, array in arrays.items():
            pieces += [_piece(trainer, name, role, entry, global_box, array[box_slices(*local)])
                       for local, global_box in pairs]
    if zero:
        pieces += _zero_moment_pieces(trainer, table, names, plan)
    return pieces


def _zero_moment_pieces(trainer, table: dict, names: list, plan: WriterPlan) -> list[dict]:
    """ZeRO-1: this rank's 1/dp of every bucket of Adam moments, as boxes of the global tensors. A
    parameter that tensor parallelism replicates has the same moments on every tp peer: the one
    the plan names writes it."""
    gradients, optimizer, mesh = trainer.gradients, trainer.optimizer, trainer.mesh
    index = set(names)
    pieces = []
    for b, bucket in enumerate(gradients.buckets):
        shard = optimizer.shards[b]
        for name in bucket.names:
            entry = table[name]
            if name not in index or (entry["axis"] is None and plan.moments[name] != mesh.tp_rank):
                continue
            begin = gradients.offsets[name]
            size = volume(gradients.shapes[name])
            lo, hi = max(begin, shard.start), min(begin + size, shard.stop)
            if lo >= hi:
                continue
            pairs = shard_boxes(entry["full_shape"], entry["axis"], entry["parts"], entry["tp_rank"],
                                entry["tp_size"])
            for role, moments in (("exp_avg", optimizer.m[b]), ("exp_avg_sq", optimizer.v[b])):
                values = to_host(moments[lo - shard.start:hi - shard.start])
                position = 0
                for box in flat_range_boxes(gradients.shapes[name], lo - begin, hi - begin):
                    block = values[position:position + volume(box[1])].reshape(box[1])
                    position += volume(box[1])
                    for local, global_box in local_to_global(box, pairs):
                        relative = box_slices([o - b0 for o, b0 in zip(local[0], box[0])], local[1])
                        pieces.append(_piece(trainer, name, role, entry, global_box, block[relative]))
    return pieces


def optimizer_scalars(optimizer) -> dict:
    """What every rank's optimizer holds alike: the step count (and a mixed run's loss scaler)."""
    scalars = {"step": int(optimizer.step_count)}
    if hasattr(optimizer, "scaler"):
        scalars.update({key: value.item() for key, value in optimizer.scaler.state_dict().items()})
    return scalars


def save_rank(trainer, checkpoint: str) -> dict:
    """Write this rank's pieces into `checkpoint` (one safetensors file, fsynced) and report them:
    {"rank", "pieces": [... "file", "byte_offset", "nbytes", "crc32"], "optimizer", "nonfinite"}.
    Weights that are not finite are not written: "nonfinite" names one, for the driver to refuse."""
    for name, weight in trainer.local_params().items():
        if not np.isfinite(weight).all():
            return {"rank": trainer.mesh.rank, "pieces": [], "optimizer": {}, "nonfinite": name}
    return {"rank": trainer.mesh.rank, "pieces": write_pieces(checkpoint, trainer.mesh.rank, owned_pieces(trainer)),
            "optimizer": optimizer_scalars(trainer.optimizer), "nonfinite": None}


def write_pieces(checkpoint: str, rank: int, pieces: list[dict]) -> list[dict]:
    """Write `pieces` (as `owned_pieces` makes them) into rank `rank`'s file of `checkpoint`,
    atomically and fsynced; returns them without their arrays, with "file", "byte_offset",
    "nbytes" and "crc32" (as the written file says)."""
    if not pieces:
        return []
    file = PIECE_FILE.format(rank=rank)
    path = os.path.join(checkpoint, file)
    save_tensors(path, {piece["key"]: piece["array"] for piece in pieces})
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    checksums = json.loads(header["__metadata__"][CHECKSUMS_KEY])
    reported = []
    for piece in pieces:
        begin, end = header[piece["key"]]["data_offsets"]
        reported.append({**{k: v for k, v in piece.items() if k != "array"}, "file": file,
                         "byte_offset": 8 + length + begin, "nbytes": end - begin, "crc32": checksums[piece["key"]]})
    return reported


# ---- reading ----------------------------------------------------------------------------------------
def verify_piece(path: str, name: str, piece: dict) -> None:
    """CorruptFileError naming the tensor and the file unless the piece's bytes match its CRC-32
    (read in chunks of at most READ_CHUNK_BYTES)."""
    crc, remaining = 0, piece["nbytes"]
    buffer = memoryview(bytearray(min(remaining, READ_CHUNK_BYTES)))  # one buffer, reused
    try:
        with open(path, "rb") as f:
            f.seek(piece["byte_offset"])
            while remaining:
                got = f.readinto(buffer[:min(remaining, len(buffer))])
                if not got:
                    raise CorruptFileError(path, f"tensor {name}: piece {piece['key']!r} is cut short")
                crc, remaining = zlib.crc32(buffer[:got], crc), remaining - got
    except OSError as exc:
        raise ValueError(f"tensor {name}: piece file {path} cannot be read ({exc.strerror or exc})") from None
    if f"crc32:{crc & 0xFFFFFFFF:08x}" != piece["crc32"]:
        raise CorruptFileError(path, f"tensor {name}: piece {piece['key']!r} does not match its checksum "
                                     f"{piece['crc32']} (the file is damaged)")


def read_box(checkpoint: str, name: str, entry: dict, box, out, verified: set) -> None:
    """Fill `out` (shaped like the box) with the box (offsets, lengths) of tensor `name`, reading
    only those bytes of the pieces it overlaps; each piece's checksum is verified on first use."""
    dtype = np.dtype(entry["dtype"])
    for piece in entry["pieces"]:
        piece_box = (tuple(piece["offsets"]), tuple(piece["lengths"]))
        common = intersect(box, piece_box)
        if common is None:
            continue
        path = os.path.join(checkpoint, piece["file"])
        if (path, piece["key"]) not in verified:
            verify_piece(path, name, piece)
            verified.add((path, piece["key"]))
        stored = np.memmap(path, dtype=dtype, mode="r", offset=piece["byte_offset"], shape=piece_box[1])
        source = box_slices([c - p for c, p in zip(common[0], piece_box[0])], common[1])
        target = box_slices([c - b for c, b in zip(common[0], box[0])], common[1])
        out[target] = stored[source]
        del stored


def _entry(checkpoint: str, tensors: dict, name: str, shape) -> dict:
    if name not in tensors:
        raise ValueError(f"tensor {name} is missing from checkpoint {checkpoint}")
    if tuple(tensors[name]["shape"]) != tuple(shape):
        raise ValueError(f"tensor {name} has shape {tensors[name]['shape']} in checkpoint {checkpoint}, "
                         f"the run expects {list(shape)}")
    return tensors[name]


def _optimizer_state(metadata: dict) -> dict:
    state = {"step": np.array(metadata["optimizer"]["step"], dtype=np.int64)}
    for key, value in metadata["optimizer"].items():
        if key != "step":
            state[key] = np.array(value, dtype=np.float64 if isinstance(value, float) else np.int64)
    return state


class _RankReader:
    """Reads boxes of this rank's shard of a parameter's weight or moment from a sharded checkpoint."""

    def __init__(self, trainer, checkpoint: str, tensors: dict):
        self.trainer, self.checkpoint, self.tensors, self.verified = trainer, checkpoint, tensors, set()
        self.table = trainer.shard_table()

    def read(self, name: str, role: str, box=None, dtype=None):
        """The box (offsets, lengths; default: all) of this rank's shard of parameter `name`'s `role`
        tensor, as a host array (zero where the shard is vocabulary padding)."""
        entry = self.table[name]
        tensor = tensor_name(hf_name(self.trainer.plan, name), role)
        stored = _entry(self.checkpoint, self.tensors, tensor, entry["full_shape"])
        if box is None:
            shape = local_shape(entry["full_shape"], entry["axis"], entry["parts"], entry["tp_size"])
            box = ((0,) * len(shape), shape)
        out = np.zeros(box[1], dtype or np.dtype(stored["dtype"]))
        pairs = shard_boxes(entry["full_shape"], entry["axis"], entry["parts"], entry["tp_rank"], entry["tp_size"])
        for local, global_box in local_to_global(box, pairs):
            relative = box_slices([o - b for o, b in zip(local[0], box[0])], local[1])
            read_box(self.checkpoint, tensor, stored, global_box, out[relative], self.verified)
        return out


def read_weights(holder, checkpoint: str) -> dict:
    """{name: this rank's shard (host array)} of the weight of every parameter in `holder.shard_table()`
    (`holder`: anything with that and the family's `plan`, as a ParallelTrainer or an inference
    generator), reading only the pieces' bytes it needs; no optimizer state."""
    reader = _RankReader(holder, checkpoint, read_metadata(checkpoint)["tensors"])
    return {name: reader.read(name, "weight") for name in holder.shard_table()}


def load_rank(trainer, checkpoint: str) -> int:
    """Take this rank's part of a sharded checkpoint into a `ParallelTrainer` (weights, Adam
    moments, optimizer scalars), reading only what it holds: its tensor-parallel shards, and with
    ZeRO-1 only its 1/dp of the moments. Returns the checkpoint's step."""
    metadata = read_metadata(checkpoint)
    reader, xp, optimizer = _RankReader(trainer, checkpoint, metadata["tensors"]), trainer.gradients.xp, trainer.optimizer
    for name, param in trainer.params.items():
        weight = reader.read(name, "weight")
        param[...] = xp.asarray(weight.astype(param.dtype))
        if trainer.master is not None:
            trainer.master[name][...] = xp.asarray(weight)
    if trainer.layout.zero:
        _load_zero_moments(trainer, reader)
    else:
        for name in optimizer.m:  # (none for a tied weight on the last stage: the first stage updates it)
            optimizer.m[name][...] = xp.asarray(reader.read(name, "exp_avg", dtype=optimizer.m[name].dtype))
            optimizer.v[name][...] = xp.asarray(reader.read(name, "exp_avg_sq", dtype=optimizer.v[name].dtype))
    optimizer.step_count = int(metadata["optimizer"]["step"])
    if hasattr(optimizer, "scaler"):  # a mixed run's loss scale (ValueError if the checkpoint has none)
        optimizer.scaler.load_state_dict(_optimizer_state(metadata))
    trainer._refresh_tied_copies()
    return int(metadata["step"])


def _load_zero_moments(trainer, reader: _RankReader) -> None:
    """ZeRO-1: fill this rank's 1/dp of every bucket of Adam moments, box by box (the inverse of
    `_zero_moment_pieces`)."""
    gradients, optimizer = trainer.gradients, trainer.optimizer
    for b, bucket in enumerate(gradients.buckets):
        shard = optimizer.shards[b]
        for name in bucket.names if gradients.updates(b) else ():
            begin = gradients.offsets[name]
            lo, hi = max(begin, shard.start), min(begin + volume(gradients.shapes[name]), shard.stop)
            if lo >= hi:
                continue
            for role, moments in (("exp_avg", optimizer.m[b]), ("exp_avg_sq", optimizer.v[b])):
                values = [reader.read(name, role, box, moments.dtype).ravel()
                          for box in flat_range_boxes(gradients.shapes[name], lo - begin, hi - begin)]
                moments[lo - shard.start:hi - shard.start] = gradients.xp.asarray(np.concatenate(values))


def load_consolidated(checkpoint: str) -> tuple:
    """(model config of the stored weights, {name: full weight}, AdamW state with full moments) of a
    sharded checkpoint, for the single-process Trainer (and an export that cannot stream)."""
    metadata = read_metadata(checkpoint)
    check_checkpoint(checkpoint, metadata)
    params, state, verified = {}, _optimizer_state(metadata), set()
    for name, entry in metadata["tensors"].items():
        shape = tuple(entry["shape"])
        full = np.empty(shape, np.dtype(entry["dtype"]))
        read_box(checkpoint, name, entry, ((0,) * len(shape), shape), full, verified)
        if entry["role"] == "weight":
            params[entry["param"]] = full
        else:
            state[{"exp_avg": "m.", "exp_avg_sq": "v."}[entry["role"]] + entry["param"]] = full
    return family_of(metadata).config(**metadata["model"]), params, state


# ---- the driver's part --------------------------------------------------------------------------------
def save_sharded_checkpoint(trainers, run_dir: str, step: int, *, config: dict, model, layout: dict,
                            tokenizer=None, keep: int | None = None) -> str:
    """Have every rank of `trainers` (a ParallelTrainer ActorGroup) write its pieces into
    RUN/checkpoints/step-N, then commit it; afterwards delete all but the newest `keep`. Returns
    the directory. `config`: the TrainConfig as a dict; `model`: the family's config of the stored
    weights. Weights that are not finite are a NonFiniteError and nothing is committed; a worker
    lost midway leaves an unfinished directory that the next run's start removes."""
    model_family = family(config.get("family", DEFAULT_FAMILY))
    checkpoint = new_checkpoint_directory(step_directory(run_dir, step))
    try:
        reports = trainers.save_checkpoint_pieces(checkpoint).result()
    except RemoteError:  # a rank could not write (a full disk): the workers live, the save is abandoned
        shutil.rmtree(checkpoint, ignore_errors=True)
        raise
    try:
        bad = next((report for report in reports if report["nonfinite"]), None)
        if bad is not None:
            raise NonFiniteError(step - 1, f"parameter {bad['nonfinite']} is not finite after the update; "
                                           f"not writing the checkpoint (lower --lr)")
        if model_family.hf_config is not None:  # what `checkpoint_family` and people read
            write_json(os.path.join(checkpoint, CONFIG_FILE), model_family.hf_config(model), indent=2)
        if tokenizer is not None:
            tokenizer.save(checkpoint)
        commit(checkpoint, reports, step=step, config=config, model=dataclasses.asdict(model), layout=layout,
               optimizer=reports[0]["optimizer"])
    except BaseException:
        shutil.rmtree(checkpoint, ignore_errors=True)  # every rank is done with it: nothing half-visible stays
        raise
    if keep is not None:
        prune(run_dir, keep)
    return checkpoint


def check_resumable(checkpoint: str, run_model, model_family: Family) -> None:
    """ValueError (one line, naming the tensor and the file) unless a sharded checkpoint is of the
    run's model (`run_model`, a config of `model_family`: its architecture fields) and holds every
    weight and Adam moment in pieces that exist, have their sizes and cover each tensor. Checksums
    (and each tensor's shape) are verified by the ranks as they read. A consolidated checkpoint is
    checked as it is read."""
    if not is_sharded(checkpoint):
        return
    plan = model_family.parallel_plan(run_model)
    names = [tensor_name(hf_name(plan, name), role) for name in parameter_names(plan)
             for role in ("weight", "exp_avg", "exp_avg_sq")]
    model = {key: getattr(run_model, key) for key in model_family.architecture_fields}
    check_checkpoint(checkpoint, read_metadata(checkpoint), names, model)


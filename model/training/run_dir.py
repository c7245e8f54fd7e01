"""A run directory: the name of every file a training run writes, and reading its checkpoint back.

    RUN/tokens.bin                  the tokenized corpus (TOKEN_FILE)
    RUN/metrics.jsonl               one JSON object per step (METRICS_FILE)
    RUN/checkpoint/                 a single-process run's resumable state, consolidated (CHECKPOINT_DIR;
                                    `.old` while swapping): model.safetensors, config.json, tokenizer
                                    files, optimizer.safetensors, trainer.json
    RUN/checkpoints/step-00000040/  a multi-worker run's sharded checkpoint (model/training/
                                    sharded_checkpoint.py): rank-00003.safetensors (the pieces each rank
                                    owns), config.json, tokenizer files, and checkpoint.json (COMMIT_FILE:
                                    every piece's place, written last; without it the directory is an
                                    unfinished save and is ignored)
    RUN/model.safetensors, RUN/config.json, RUN/tokenizer files   the final model
    RUN/trace-rank{r}.json, clocks.json, schedule.json   a traced run (`ringpipe train --trace`)
    RUN/trace.html, RUN/trace.json  what `ringpipe trace view|export` write by default
    OUT/ringpipe-export.json        beside the model files `ringpipe export RUN --out OUT` writes: the
                                    run they came from (EXPORT_RECORD_FILE)
    RUN/.lock                       flock'ed by the driver of the run training into RUN (LOCK_FILE;
                                    holds "pid P on HOST"); the kernel frees it when that process ends

The model files are named by the model's checkpoint format (model/gpt2/checkpoint.py) and the
tokenizer's (model/data/tokenizer.py); the trace files by runtime.Cluster.stop_trace. They are
repeated or imported here so that this is the one list to read.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
from typing import TYPE_CHECKING

from ringpipe.model.data.tokenizer import TOKENIZER_FILES
from ringpipe.model.gpt2.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ringpipe.model.quantization.int8_format import quantization_config

if TYPE_CHECKING:
    from ringpipe.model.training.config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
PREVIOUS_CHECKPOINT_DIR = CHECKPOINT_DIR + ".old"  # kept while a new checkpoint is swapped in
TRAINER_STATE_FILE = "trainer.json"
SHARDED_CHECKPOINTS_DIR = "checkpoints"
COMMIT_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
OPTIMIZER_FILE = "optimizer.safetensors"
TOKEN_FILE = "tokens.bin"
METRICS_FILE = "metrics.jsonl"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, *TOKENIZER_FILES)
# Written by runtime.Cluster.stop_trace (runtime/ names them itself: it imports nothing of model/).
TRACE_RANK_GLOB = "trace-rank*.json"
CLOCKS_FILE = "clocks.json"
SCHEDULE_FILE = "schedule.json"  # written by the driver of a traced run
TRACE_VIEW_FILE = "trace.html"
TRACE_EXPORT_FILE = "trace.json"
TRACE_FILES = (TRACE_RANK_GLOB, CLOCKS_FILE, SCHEDULE_FILE)
LOCK_FILE = ".lock"
EXPORT_RECORD_FILE = "ringpipe-export.json"  # in an export's --out (not RUN_DIR): {"run": RUN_DIR}
LOGS_DIR = "logs"  # rank-R.log of each worker of a multi-worker run (runtime/rank_logs.py)


def step_directory(run_dir: str, step: int) -> str:
    """Where the sharded checkpoint after `step` steps lives."""
    return os.path.join(run_dir, SHARDED_CHECKPOINTS_DIR, f"step-{step:08d}")


def sharded_checkpoints(run_dir: str, committed: bool = True) -> list[tuple[int, str]]:
    """[(step, path)] of the run's sharded checkpoint directories, oldest first: the committed ones
    (their COMMIT_FILE written), or with `committed=False` the unfinished ones."""
    parent = os.path.join(run_dir, SHARDED_CHECKPOINTS_DIR)
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    found = []
    for name in names:
        match = _STEP_DIR.match(name)
        path = os.path.join(parent, name)
        if match and os.path.isdir(path) and os.path.isfile(os.path.join(path, COMMIT_FILE)) == committed:
            found.append((int(match[1]), path))
    return sorted(found)


def find_checkpoint(run_dir: str) -> str:
    """The run's latest checkpoint: the newest committed sharded one, or the consolidated one
    (the previous one if a swap was interrupted), whichever has more steps."""
    quantized = quantization_config(run_dir)
    if quantized is not None:
        raise ValueError(f"{run_dir} holds an int8 model written by ringpipe quantize, not a training run: int8 "
                         f"weights cannot be trained; resume the float run it came from ({quantized.get('source')})")
    sharded = sharded_checkpoints(run_dir)
    consolidated = next((path for path in (os.path.join(run_dir, CHECKPOINT_DIR),
                                           os.path.join(run_dir, PREVIOUS_CHECKPOINT_DIR))
                         if os.path.isfile(os.path.join(path, TRAINER_STATE_FILE))), None)
    if sharded and consolidated is not None:
        try:
            newer = read_trainer_state(consolidated)["step"] > sharded[-1][0]
        except ValueError:  # unreadable: the sharded one is the checkpoint to use
            newer = False
        return consolidated if newer else sharded[-1][1]
    if sharded or consolidated is not None:
        return sharded[-1][1] if sharded else consolidated
    raise ValueError(f"no checkpoint in {run_dir} (expected {run_dir}/{CHECKPOINT_DIR}/"
                     f"{TRAINER_STATE_FILE} or {run_dir}/{SHARDED_CHECKPOINTS_DIR}/step-N/{COMMIT_FILE})")


def read_trainer_state(checkpoint: str) -> dict:
    """{"step": steps completed, "config": TrainConfig} of a checkpoint directory; ValueError naming
    the file if it is missing or corrupt."""
    from ringpipe.model.training.config import TrainConfig  # here: the trace tools read the names above alone

    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    if os.path.isfile(os.path.join(checkpoint, COMMIT_FILE)):  # a sharded checkpoint records the same
        path = os.path.join(checkpoint, COMMIT_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
        # Checkpoints written before the epoch sampler existed drew random windows; keep doing so.
        # TrainConfig also takes the flat model options of checkpoints from before `TrainConfig.model`.
        state["config"] = TrainConfig(**{"sampler": "random", **state["config"]})
        state["step"] = int(state["step"])
        return state
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"corrupt checkpoint file {path}: {exc}") from None


def saved_config(run_dir: str) -> TrainConfig:
    """The TrainConfig stored in the run's checkpoint."""
    return read_trainer_state(find_checkpoint(run_dir))["config"]


def saved_step(run_dir: str) -> int:
    """Steps completed by the run's checkpoint (ValueError if there is none)."""
    return read_trainer_state(find_checkpoint(run_dir))["step"]


def remove_traces(out: str) -> None:
    """Delete an earlier run's traces from `out` (before a traced run writes its own: a resumed run
    at another layout writes fewer ranks, and the earlier run's other ranks must not stay beside
    them)."""
    for pattern in (*TRACE_FILES, TRACE_VIEW_FILE):
        for path in glob.glob(os.path.join(out, pattern)):
            os.remove(path)


def remove_run(out: str) -> None:
    """Delete what an earlier run wrote into `out` (only ringpipe's own files)."""
    for pattern in (CHECKPOINT_DIR, PREVIOUS_CHECKPOINT_DIR, CHECKPOINT_DIR + ".tmp-*", "model.tmp-*",
                    SHARDED_CHECKPOINTS_DIR, LOGS_DIR):
        for path in glob.glob(os.path.join(out, pattern)):
            shutil.rmtree(path, ignore_errors=True)
    for pattern in (METRICS_FILE, TOKEN_FILE, *MODEL_FILES, *TRACE_FILES, TRACE_VIEW_FILE):
        for path in glob.glob(os.path.join(out, pattern)):
            os.remove(path)


def lock_run_dir(run_dir: str) -> int:
    """An exclusive flock on RUN/.lock (the directory made if need be), for the life of a training
    run: returns its file descriptor, to os.close when the run ends (the kernel releases it if the
    process dies, so a killed run leaves no stale lock). ValueError naming the holder if another
    process holds it."""
    from ringpipe.runtime.files import make_directory

    make_directory(run_dir)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise ValueError(f"{run_dir} is in use by another training run ({holder}; {path}); wait for it "
                         "to end or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def check_export_target(run_dir: str, out: str) -> None:
    """ValueError unless `ringpipe export RUN --out OUT` may write its model files into `out`: RUN
    itself, a new or empty directory, or an earlier export of RUN (its EXPORT_RECORD_FILE names RUN).
    Another run's directory or export, model files of unknown origin, or files of its own are refused
    before anything is written, and so is a directory in any run's own files (`check_outside_runs`)."""
    check_outside_runs(run_dir, out)
    if not os.path.isdir(out) or os.path.realpath(out) == os.path.realpath(run_dir):
        return
    held = set(os.listdir(out))
    other = sorted(held - set(MODEL_FILES) - {EXPORT_RECORD_FILE})
    if other:
        raise ValueError(f"{out} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); "
                         "export writes model.safetensors, config.json and the tokenizer there, so give a new "
                         "directory, RUN_DIR itself or an earlier export's")
    try:
        with open(os.path.join(out, EXPORT_RECORD_FILE)) as f:
            source = json.load(f).get("run")
    except (OSError, ValueError, AttributeError):
        source = None
    if held and not _of_run(source, run_dir):
        whose = f"the export of another run ({source})" if source else f"model files without {EXPORT_RECORD_FILE}"
        raise ValueError(f"{out} holds {whose}; export replaces only an earlier export of {run_dir}, so give a "
                         "new directory or RUN_DIR itself")


def export_record(run_dir: str) -> dict:
    """What an export writes into its --out as EXPORT_RECORD_FILE: the run it came from."""
    return {"run": os.path.realpath(run_dir)}


def check_quantize_target(run_dir: str, out: str) -> None:
    """ValueError unless `ringpipe quantize RUN --out OUT` may replace `out` whole: a new or empty
    directory, or an earlier int8 model of RUN (its quantization_config's source lies in RUN), outside
    every run's own files (`check_outside_runs`)."""
    check_outside_runs(run_dir, out)
    if not os.path.isdir(out) or not os.listdir(out):
        return
    quantized = quantization_config(out)
    if quantized is None:
        raise ValueError(f"{out} holds other files; quantize replaces it whole, so give a new directory or an "
                         "earlier int8 output")
    if not _of_run(quantized.get("source"), run_dir):
        raise ValueError(f"{out} holds the int8 model of another run ({quantized.get('source')}); quantize "
                         f"replaces only an earlier int8 model of {run_dir}, so give a new directory")


def _of_run(source, run_dir: str) -> bool:
    """Whether `source`, a path an output recorded as where it came from, is `run_dir` or lies inside it."""
    if not isinstance(source, str):
        return False
    source, run_dir = os.path.realpath(source), os.path.realpath(run_dir)
    return source == run_dir or source.startswith(run_dir + os.sep)


def _is_run_directory(path: str) -> bool:
    """Whether `path` holds what only training writes (its metrics, corpus tokens or checkpoints)."""
    return (any(os.path.isfile(os.path.join(path, name)) for name in (METRICS_FILE, TOKEN_FILE))
            or any(os.path.isdir(os.path.join(path, name)) for name in (CHECKPOINT_DIR, SHARDED_CHECKPOINTS_DIR)))


def check_outside_runs(run_dir: str, out: str) -> None:
    """ValueError unless `out`, where `ringpipe export|quantize RUN --out OUT` writes a model, stays
    out of every run's own files: not another run directory or anything inside one, and not RUN's
    checkpoint/, checkpoint.old/ or checkpoints/ (a later resume, export or quantize would read the
    files written there as the run's). RUN itself and its other subdirectories are allowed."""
    target, own = os.path.realpath(out), os.path.realpath(run_dir)
    for name in (CHECKPOINT_DIR, PREVIOUS_CHECKPOINT_DIR, SHARDED_CHECKPOINTS_DIR):
        reserved = os.path.join(own, name)
        if target == reserved or target.startswith(reserved + os.sep):
            where = f"{run_dir}'s {name}/" if target == reserved else f"inside {run_dir}'s {name}/"
            raise ValueError(f"{out} is {where}, which only training writes; give a directory outside it")
    path = target
    while True:  # the nearest run directory that `out` is or lies in (existing ancestors only)
        if path != own and _is_run_directory(path):
            where = f"another run's directory ({path})" if path == target else f"inside another run's directory {path}"
            raise ValueError(f"{out} is {where}; give a directory outside it")
        if path == own or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)

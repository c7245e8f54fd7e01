"""Every file ringpipe writes goes through here: atomic, checked, and failing in one line.

    with atomic_write(path) as f:          # a temporary beside `path`, fsynced, renamed over it
        f.write(data)
    with staged_directory(run/"checkpoint") as stage:   # a whole directory swapped in at once
        save_tensors(os.path.join(stage, "weights.safetensors"), tensors)

Temporaries are named `NAME.tmp-HOST-PID-START-RANDOM` after the writing process (START is its
start time, so a reused pid is not mistaken for the writer), and `remove_dead_temporaries(dir)`
deletes those whose writer is gone: what a killed process leaves behind disappears on the next
start. Any OSError while writing removes the temporary and becomes one `FileWriteError` naming the
destination and the cause; the destination keeps its previous content.

Tensors are stored as safetensors with a CRC-32 of each tensor's bytes in the header metadata
(`save_tensors`), verified by `load_tensors`; a mismatch is a `CorruptFileError` naming the file
and the tensor. Files without checksums (written before they existed) load unverified.

Imports nothing from the rest of ringpipe.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import zlib

CHECKSUMS_KEY = "ringpipe.checksums"  # safetensors metadata: JSON {tensor name: "crc32:8 hex digits"}


class FileWriteError(Exception):
    """A file could not be written: `path` (the destination) and `cause` (e.g. the strerror)."""

    def __init__(self, path: str, cause: str):
        self.path, self.cause = path, cause
        super().__init__(f"cannot write {path}: {cause}")


class CorruptFileError(ValueError):
    """A file's stored data contradicts its checksum or its own record (`path`, `detail`)."""

    def __init__(self, path: str, detail: str):
        self.path, self.detail = path, detail
        super().__init__(f"corrupt file {path}: {detail}")


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- temporaries named after their writer ---------------------------------------------------------
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:32] or "host"
_TEMP_NAME = re.compile(r"^(?P<base>.+)\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux); 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return 0


def temporary_name(path: str) -> str:
    """A temporary path beside `path`, named after this process (see `remove_dead_temporaries`)."""
    head, base = os.path.split(os.path.abspath(path))
    token = f"{_HOST}-{os.getpid()}-{_start_time(os.getpid())}-{secrets.token_hex(4)}"
    return os.path.join(head, f"{base}.tmp-{token}")


def _writer_alive(host: str, pid: int, start: int) -> bool:
    if host != _HOST:
        return True  # another machine's process (shared filesystem): cannot tell, so keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start == 0 or _start_time(pid) in (0, start)


def remove_dead_temporaries(directory: str) -> list[str]:
    """Delete the temporaries in `directory` whose writing process has ended; returns their paths."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _TEMP_NAME.match(name)
        if not match or _writer_alive(match["host"], int(match["pid"]), int(match["start"])):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


# ---- single files --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: str | None = None):
    """Open a temporary beside `path` for writing; on success fsync it and rename it over `path`.

    Any OSError (full disk, permission, missing directory) removes the temporary and raises
    FileWriteError(path, cause); other exceptions remove the temporary and propagate.
    """
    path = os.fspath(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        _remove(tmp)
        raise FileWriteError(path, _cause(exc)) from None
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path, data) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path, obj, **dump_options) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_options)


class AppendLog:
    """A file appended line by line (e.g. metrics.jsonl); a failed write is a FileWriteError."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise FileWriteError(path, _cause(exc)) from None

    def write(self, text: str) -> None:
        try:
            self.file.write(text)
        except OSError as exc:
            raise FileWriteError(self.path, _cause(exc)) from None

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            raise FileWriteError(self.path, _cause(exc)) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # whatever could not be flushed was reported by flush
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# ---- whole directories ---------------------------------------------------------------------------
@contextlib.contextmanager
def staged_directory(path, merge: bool = False):
    """Yield an empty temporary directory beside `path`; on success its files are fsynced and it
    replaces `path` whole. While the swap runs the previous content sits at `path + ".old"` (a
    reader may fall back to it); afterwards that is deleted. With `merge`, an existing non-empty
    `path` is kept and each staged file is renamed into it instead. Errors as in `atomic_write`,
    naming the file under `path` that could not be written. Dead writers' temporaries beside
    `path` are removed first."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise FileWriteError(path, _cause(exc)) from None
    merge = merge and os.path.isdir(path) and bool(os.listdir(path))
    # Merging stages inside `path` itself: its parent may be another filesystem (a mount point).
    stage = temporary_name(os.path.join(path, "staging") if merge else path)
    remove_dead_temporaries(os.path.dirname(stage))
    previous = path + ".old"
    try:
        os.mkdir(stage)
        yield stage
        for name in os.listdir(stage):
            fd = os.open(os.path.join(stage, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(stage)
        if merge:
            for name in sorted(os.listdir(stage)):
                os.replace(os.path.join(stage, name), os.path.join(path, name))
            _fsync_directory(path)
            _remove(stage)
            return
        if os.path.isdir(path):
            _remove(previous)
            os.replace(path, previous)
        os.replace(stage, path)
        _fsync_directory(parent)
    except (OSError, FileWriteError) as exc:
        _remove(stage)
        failed = getattr(exc, "path", None) or getattr(exc, "filename", None) or path
        failed = os.fspath(failed)
        if failed.startswith(stage):
            failed = path + failed[len(stage):]
        raise FileWriteError(failed, exc.cause if isinstance(exc, FileWriteError) else _cause(exc)) from None
    except BaseException:
        _remove(stage)
        raise
    _remove(previous)


def make_directory(path) -> None:
    """os.makedirs(path, exist_ok=True), failing as FileWriteError(path, cause)."""
    try:
        os.makedirs(os.fspath(path), exist_ok=True)
    except OSError as exc:
        raise FileWriteError(os.fspath(path), _cause(exc)) from None


# ---- preflight -----------------------------------------------------------------------------------
def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable_directory(path) -> None:
    """FileWriteError unless `path` is (or can be created as) a directory we can write into.
    Probes by creating and removing a temporary, so read-only filesystems and /proc are caught."""
    path = os.path.abspath(os.fspath(path))
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise FileWriteError(path, f"{existing} is not a directory")
    probe = temporary_name(os.path.join(existing, ".probe"))
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as exc:
        _remove(probe)
        raise FileWriteError(path, _cause(exc) if existing == path else
                             f"cannot create it in {existing} ({_cause(exc)})") from None


def check_writable_file(path) -> None:
    """FileWriteError unless a file can be written at `path` (its directory exists, is writable,
    and `path` is not a directory)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise FileWriteError(path, "is a directory")
    if not os.path.isdir(parent):
        raise FileWriteError(path, f"directory {parent} does not exist")
    probe = temporary_name(path)
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise FileWriteError(path, _cause(exc)) from None
    finally:
        _remove(probe)


# ---- tensors with checksums ----------------------------------------------------------------------
def tensor_checksum(array) -> str:
    """"crc32:xxxxxxxx" of an array's bytes in C order (as safetensors stores them)."""
    import numpy as np

    return f"crc32:{zlib.crc32(_raw_bytes(np.require(array, requirements='C'))) & 0xFFFFFFFF:08x}"


def _raw_bytes(array):
    """A C-contiguous array's bytes as a flat uint8 view (0-d, empty and bool arrays included)."""
    return array.reshape(-1).view("uint8")


# safetensors' dtype names (the format's public spec); data is little-endian, C order.
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                       "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                       "uint8": "U8", "bool": "BOOL"}
SAFETENSORS_DTYPES = _SAFETENSORS_DTYPES  # for writers that build a safetensors header themselves


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: array} as a safetensors file, atomically, with a checksum per tensor in the
    metadata. Streamed tensor by tensor: no second copy of the data is built in memory (an array
    that is not C-contiguous little-endian, e.g. a strided view, is copied one at a time, twice)."""
    import numpy as np

    arrays = {}
    for name, array in tensors.items():
        array = np.asarray(array)
        if array.dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {array.dtype}, which safetensors cannot store")
        arrays[name] = array
    checksums = {name: tensor_checksum(_stored_form(a)) for name, a in arrays.items()}
    encoded = safetensors_header([(n, a.dtype.name, a.shape, a.nbytes) for n, a in arrays.items()], metadata or {}, checksums)
    with atomic_write(path) as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays.values():
            f.write(_raw_bytes(_stored_form(array)))


def safetensors_header(entries: list, metadata: dict, checksums: dict) -> bytes:
    """The header of a safetensors file holding `entries` [(name, NumPy dtype name, shape, nbytes)]
    back to back, `metadata` and `checksums` ({name: "crc32:..."}), space-padded to 8 bytes. Every
    writer's, with metadata keys and checksum names sorted: two paths writing the same model (a
    run's end, an export of its checkpoint) give one file, however their dicts were built."""
    stored = {**metadata, CHECKSUMS_KEY: json.dumps(checksums, separators=(",", ":"), sort_keys=True)}
    header, offset = {"__metadata__": dict(sorted(stored.items()))}, 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [int(n) for n in shape],
                        "data_offsets": [offset, offset + int(nbytes)]}
        offset += int(nbytes)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)


def _stored_form(array):
    """The array as safetensors stores it: C order, little-endian (a copy only where it is not)."""
    import numpy as np

    array = np.require(array, requirements="C")  # not ascontiguousarray: it turns 0-d into 1-d
    return array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array


def load_tensors(path, verify: bool = True) -> tuple[dict, dict]:
    """-> ({name: array}, metadata). CorruptFileError if the file cannot be parsed or a tensor's
    bytes differ from its stored checksum (files without checksums are not verified);
    FileNotFoundError if it is missing."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CorruptFileError(path, f"not a readable safetensors file ({_cause(exc)})") from None
    if verify and CHECKSUMS_KEY in metadata:
        try:
            expected = json.loads(metadata[CHECKSUMS_KEY])
        except ValueError:
            raise CorruptFileError(path, f"metadata {CHECKSUMS_KEY} is not valid JSON") from None
        if set(expected) != set(tensors):
            missing = sorted(set(expected) ^ set(tensors))[:3]
            raise CorruptFileError(path, f"tensors {missing} do not match the checksummed set")
        for name, array in tensors.items():
            if tensor_checksum(array) != expected[name]:
                raise CorruptFileError(path, f"tensor {name} does not match its checksum "
                                             f"{expected[name]} (the file is damaged)")
    return tensors, metadata

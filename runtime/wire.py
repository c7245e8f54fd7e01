"""Wire format: one msgpack header frame plus zero or more raw buffer frames. Never pickle.

Arrays inside a value are replaced in the header by an extension record (frame index, dtype,
shape); their bytes travel as separate frames, so large buffers go through ZeroMQ without being
copied into the header. Decoding validates everything it reads: a malformed message raises
`WireError` and nothing in it is executed.
"""
from __future__ import annotations

import math
import threading

import msgpack
import numpy as np

ARRAY_EXT = 1
# Only plain numeric dtypes cross the wire: no object, string or structured dtypes.
ALLOWED_DTYPE_KINDS = set("biufc")
MAX_HEADER_BYTES = 64 << 20


class WireError(ValueError):
    """A message that does not follow the wire format."""


def _as_sendable_array(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in ALLOWED_DTYPE_KINDS:
        raise TypeError(f"arrays of dtype {array.dtype} cannot be sent (numeric dtypes only)")
    # np.ascontiguousarray would turn a 0-d array into 1-d; keep the shape.
    return array if array.flags.c_contiguous else array.copy(order="C")


_local = threading.local()


def _spec_packer() -> msgpack.Packer:
    """This thread's packer for array records: msgpack.packb called inside another packb's
    `default` costs ~20 us a call, a reused Packer well under 1 us (encode runs on several threads)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode(value) -> list:
    """Encode `value` (msgpack-able values, NumPy arrays and scalars, nested) into frames.

    Returns [header_bytes, buffer, buffer, ...]; buffers are memoryviews of the arrays (no copy).
    """
    buffers: list = []

    def default(obj):
        if isinstance(obj, np.generic):
            obj = np.asarray(obj)
        if isinstance(obj, np.ndarray):
            array = _as_sendable_array(obj)
            index = len(buffers)
            buffers.append(memoryview(array.reshape(-1)).cast("B") if array.size else b"")
            return msgpack.ExtType(ARRAY_EXT, _spec_packer().pack([index, array.dtype.str, list(array.shape)]))
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"value of type {type(obj).__name__} cannot be sent (msgpack values and NumPy arrays only)")

    header = msgpack.packb(value, default=default, use_bin_type=True, strict_types=False)
    if len(header) > MAX_HEADER_BYTES:
        # The receiver would reject it (decode_header): refuse here, where the sender can report it.
        raise WireError(f"header of {len(header)} bytes exceeds the control-message limit of {MAX_HEADER_BYTES} "
                        "bytes (send large data as NumPy arrays, which travel outside the header)")
    return [header, *buffers]


def _array_spec(data: bytes):
    try:
        spec = msgpack.unpackb(data, raw=False)
        index, dtype_str, shape = spec
        dtype = np.dtype(dtype_str)
    except Exception as exc:
        raise WireError(f"bad array record in header: {exc}") from None
    if not isinstance(index, int) or index < 0:
        raise WireError(f"bad array frame index {index!r}")
    if dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.fields is not None:
        raise WireError(f"array dtype {dtype_str!r} is not allowed on the wire")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise WireError(f"bad array shape {shape!r}")
    return index, dtype, tuple(shape)


def decode_header(header: bytes) -> tuple[object, list]:
    """Parse a header; arrays come back as placeholders listed in the second return value.

    Returns (value, specs) where specs[i] = (frame_index, dtype, shape) and each placeholder in
    `value` is an `ArraySlot` that `fill` replaces by the real array.
    """
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    specs: list = []

    def ext_hook(code, data):
        if code != ARRAY_EXT:
            raise WireError(f"unknown extension type {code}")
        spec = _array_spec(data)
        specs.append(spec)
        return ArraySlot(len(specs) - 1)

    try:
        value = msgpack.unpackb(header, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"header is not valid msgpack: {exc}") from None
    return value, specs


def peek_call(header: bytes) -> tuple[object, object]:
    """The ("t", "id") entries of a top-level map header without building its other values, so a
    message rejected by `decode_header` (too large, a bad record) can still fail the call it names.
    Returns (None, None) when they cannot be read."""
    kind = call_id = None
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(header), 1), strict_map_key=False)
        unpacker.feed(header)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == "t":
                kind = unpacker.unpack()
            elif key == "id":
                call_id = unpacker.unpack()
            else:
                unpacker.skip()
    except Exception:  # noqa: BLE001 - a best-effort look at a message already known to be bad
        pass
    return kind, call_id


class ArraySlot:
    """Placeholder for an array whose bytes arrive in a later frame."""

    __slots__ = ("slot",)

    def __init__(self, slot: int):
        self.slot = slot


def expected_nbytes(spec) -> int:
    _, dtype, shape = spec
    return math.prod(shape) * dtype.itemsize  # Python ints: no overflow, no NumPy call


def array_from_frame(spec, frame) -> np.ndarray:
    """A writable array for `spec` backed by (or copied from) `frame` (bytes-like)."""
    _, dtype, shape = spec
    view = memoryview(frame)
    if view.nbytes != expected_nbytes(spec):
        raise WireError(f"array frame has {view.nbytes} bytes, header says {expected_nbytes(spec)}")
    array = np.frombuffer(view, dtype=dtype) if view.nbytes else np.empty(0, dtype)
    if not array.flags.writeable:
        array = array.copy()
    return array.reshape(shape)


def fill(value, arrays: list):
    """Replace every `ArraySlot` in `value` by `arrays[slot]`."""
    if isinstance(value, ArraySlot):
        return arrays[value.slot]
    if isinstance(value, list):
        return [fill(v, arrays) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, arrays) for k, v in value.items()}
    return value


def decode(frames: list):
    """Inverse of `encode` for a complete list of frames (used on the control plane)."""
    if not frames:
        raise WireError("empty message")
    value, specs = decode_header(bytes(frames[0]))
    arrays = []
    for spec in specs:
        index = spec[0]
        if index + 1 >= len(frames):
            raise WireError(f"message references frame {index + 1} but has {len(frames)} frames")
        arrays.append(array_from_frame(spec, frames[index + 1]))
    if len(frames) != len(specs) + 1:
        raise WireError(f"message has {len(frames)} frames, header describes {len(specs) + 1}")
    return fill(value, arrays) if specs else value

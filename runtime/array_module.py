"""The one place where ringpipe decides which array module (NumPy or CuPy) holds arrays.

Everything else asks here: `array_module("cpu")` / `array_module("gpu")`, `module_of(x)`,
`to_host(x)`. CuPy is imported lazily so that CPU-only machines never need it.
"""
from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "gpu")


def array_module(device: str = "cpu"):
    """NumPy for device "cpu", CuPy for device "gpu" (clear error when CuPy or a GPU is missing)."""
    if device == "cpu":
        return np
    if device == "gpu":
        try:
            import cupy
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError("device 'gpu' needs CuPy: pip install 'ringpipe[gpu]' (CUDA 13; "
                           "'ringpipe[gpu-cuda12]' for a CUDA 12 driver)") from exc
        if cupy.cuda.runtime.getDeviceCount() < 1:  # pragma: no cover
            raise RuntimeError("device 'gpu' asked for, but CuPy sees no CUDA device")
        return cupy
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")


def is_device_array(x) -> bool:
    """True for a CuPy array (without importing CuPy when it is not loaded)."""
    return type(x).__module__.startswith("cupy")


def module_of(x):
    """The array module that owns `x`."""
    if type(x) is np.ndarray:  # the common case first: ops ask this several times per call
        return np
    if is_device_array(x):
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """A NumPy view/copy of `x` (device arrays are copied to host memory)."""
    if is_device_array(x):
        return x.get()
    return np.asarray(x)


def device_of(x) -> str:
    return "gpu" if is_device_array(x) else "cpu"

"""Small C helpers of the runtime, compiled on first use with the machine's C compiler and cached
under `$RINGPIPE_CACHE` (default ~/.cache/ringpipe), keyed by a hash of the source and flags.

Workers starting together may each compile: each writes a temporary file and renames it into
place, so that is harmless. Callers keep a pure-Python fallback for machines without a compiler.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ringpipe.runtime import thread_priority

SOURCES = Path(__file__).with_name("csrc")


def cache_dir() -> Path:
    root = os.environ.get("RINGPIPE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ringpipe"


# -O3: gcc's -O2 vectorizes only loops whose trip count it knows, so the reduction loops
# (csrc/reduce_loops.h) ran one element at a time: a 2-rank 64 KiB all_reduce round took 21 µs in C
# where 8.7 µs does it vectorized (SSE2 is enough: the loops are memory-bound). No FMA contraction:
# a fused multiply-add rounds differently from NumPy, and every path must give the same bits.
FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off")


def build(name: str, flags=FLAGS, sources=None) -> ctypes.CDLL:
    """runtime/csrc/`name`.c (or the csrc files `sources`, compiled into one library named `name`)
    as a loaded library (ctypes releases the GIL during its calls). Raises RuntimeError naming the
    compiler and its last error line when it cannot be built."""
    paths = [SOURCES / source for source in (sources or [f"{name}.c"])]
    headers = sorted(SOURCES.glob("*.h"))  # what the sources may include: a change rebuilds them too
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in paths + headers) + " ".join(flags).encode()
                            + platform.machine().encode())
    target = cache_dir() / f"{name}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC)")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            # At the process's priority: the caller may be a channel's thread, whose raised nice a
            # child process inherits (runtime/thread_priority.py).
            with thread_priority.as_process():
                result = subprocess.run([compiler, *flags, "-o", tmp, *map(str, paths)], capture_output=True,
                                        text=True, timeout=120)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
                raise RuntimeError(f"{compiler} failed on {', '.join(path.name for path in paths)}: {last}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def extension(module: str, name: str, sources):
    """The csrc files `sources` built (as `build` does, into `name`) and loaded as the CPython
    extension module `module` (its PyInit_`module`): for calls that take arrays through the buffer
    protocol, where a ctypes call with array addresses costs ~15 µs. Raises RuntimeError as `build`
    does, ImportError when it cannot be loaded."""
    import importlib.machinery
    import importlib.util
    import sysconfig

    path = build(name, (*FLAGS, f"-I{sysconfig.get_paths()['include']}"), sources)._name
    loader = importlib.machinery.ExtensionFileLoader(module, path)
    loaded = importlib.util.module_from_spec(importlib.util.spec_from_loader(module, loader))
    loader.exec_module(loaded)
    return loaded


__all__ = ["build", "cache_dir", "extension"]

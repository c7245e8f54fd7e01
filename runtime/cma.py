"""Single-copy reads from another process's memory: Linux cross-memory attach (process_vm_readv(2),
the path OpenMPI's shared-memory transport takes for large messages). One system call copies bytes
from a peer's private array straight into this process's memory, with no shared staging buffer.

The kernel allows it only where this process may ptrace the peer (same user and a permissive Yama
`ptrace_scope`, or CAP_SYS_PTRACE) and no seccomp filter forbids the call. ctypes releases the GIL
during the call.

The probe, one for every single-copy path (the collectives of runtime/shm_cma.py, `sendrecv` of
runtime/shm_p2p_single_copy.py): each process holds a private word with a random nonce
(`probe_word`), and publishes its pid, the word's address and the nonce to its peers; a peer may
read it single-copy when `can_read` gives the nonce back from that address. Not only the errno: a
pid from another PID namespace may name an unrelated process here. A process takes part only where
`wanted()`: its libc has the call, and neither `RINGPIPE_CMA=0` (from its start) nor `set_mode("off")`
turned it off. Where a probe says no, the caller keeps its copying path.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _load():
    try:
        function = ctypes.CDLL(None, use_errno=True).process_vm_readv
    except (OSError, AttributeError):  # not Linux, or a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.POINTER(_IoVec),
                         ctypes.c_ulong, ctypes.c_ulong]
    function.restype = ctypes.c_ssize_t
    return function


_readv = _load()


def available() -> bool:
    """True where this libc has process_vm_readv (whether a peer allows it, only a read tells)."""
    return _readv is not None


class Reader:
    """Reads from other processes, reusing its two iovecs (one Reader per thread)."""

    def __init__(self):
        self._local, self._remote = _IoVec(), _IoVec()
        self._local_ref, self._remote_ref = ctypes.byref(self._local), ctypes.byref(self._remote)

    def read(self, pid: int, remote_address: int, nbytes: int, out_address: int) -> None:
        """Copy `nbytes` from `remote_address` in process `pid` to `out_address` here. Raises
        OSError (errno EPERM: not allowed; ESRCH: no such process, e.g. it died; EFAULT: the peer
        has no such memory) naming the pid and the range."""
        if _readv is None:
            raise OSError(errno.ENOSYS, "process_vm_readv is not available here")
        done = 0
        while done < nbytes:  # the kernel may copy less than asked (a range crossing a mapping's end)
            self._local.base, self._local.length = out_address + done, nbytes - done
            self._remote.base, self._remote.length = remote_address + done, nbytes - done
            got = _readv(pid, self._local_ref, 1, self._remote_ref, 1, 0)
            if got <= 0:
                code = ctypes.get_errno() if got < 0 else errno.EFAULT
                if code == errno.EINTR:
                    continue
                raise OSError(code, f"process_vm_readv of {nbytes} bytes at {remote_address:#x} of pid {pid} "
                                    f"failed after {done}: {os.strerror(code)}")
            done += got


def read(pid: int, remote_address: int, nbytes: int, out_address: int) -> None:
    """`Reader().read(...)` (see there)."""
    Reader().read(pid, remote_address, nbytes, out_address)


_settings = {"on": os.environ.get("RINGPIPE_CMA", "1") != "0"}
# This process's probe word, alive as long as the process (no peer ever reads a word that is gone);
# a forked child draws its own nonce, so that the word names one process.
_probe = ctypes.c_uint64(0)


def _draw_nonce() -> None:
    _probe.value = secrets.randbits(63) | 1


_draw_nonce()
os.register_at_fork(after_in_child=_draw_nonce)


def set_mode(mode: str) -> None:
    """"on" (where the probes allow) or "off" (this process's probes say no from now on: the
    collectives of a group that probes next, and `sendrecv` state made after), for this process;
    `RINGPIPE_CMA=0` sets "off" for a worker from its start. Raises ValueError for another mode."""
    if mode not in ("on", "off"):
        raise ValueError(f"single-copy mode {mode!r}: expected 'on' or 'off'")
    _settings["on"] = mode == "on"


def mode() -> str:
    """"on" or "off": what `set_mode` or `RINGPIPE_CMA` last said for this process."""
    return "on" if _settings["on"] else "off"


def wanted() -> bool:
    """Whether this process reads its peers single-copy at all: this libc has process_vm_readv and
    the mode is "on" (whether a peer allows it, only `can_read` tells)."""
    return _settings["on"] and _readv is not None


def probe_word() -> tuple[int, int]:
    """(address, nonce) of this process's probe word: what a peer passes to `can_read`, with this
    process's pid."""
    return ctypes.addressof(_probe), _probe.value


def can_read(reader: Reader, pid: int, address: int, nonce: int) -> bool:
    """The probe: True when `reader` reads `nonce` back from the probe word at `address` in process
    `pid` (as `probe_word` there gave them); False when the kernel refuses the read (EPERM: a strict
    Yama ptrace_scope, seccomp, another user, a non-dumpable peer; ESRCH: no such process; ...) or
    the word holds another value (`pid` names another process)."""
    word = ctypes.c_uint64(0)
    try:
        reader.read(pid, address, 8, ctypes.addressof(word))
    except OSError:
        return False
    return word.value == nonce


__all__ = ["Reader", "read", "available", "wanted", "mode", "set_mode", "probe_word", "can_read"]

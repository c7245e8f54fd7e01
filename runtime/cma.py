"""Single-copy reads from another process's memory: Linux cross-memory attach (process_vm_readv(2),
the path OpenMPI's shared-memory transport takes for large messages). One system call copies bytes
from a peer's private array straight into this process's memory, with no shared staging buffer.

The kernel allows it only where this process may ptrace the peer (same user and a permissive Yama
`ptrace_scope`, or CAP_SYS_PTRACE) and no seccomp filter forbids the call: callers probe once and
keep another path where it fails (runtime/shm_cma.py). ctypes releases the GIL during the call.
"""
from __future__ import annotations

import ctypes
import errno
import os


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


__all__ = ["Reader", "read", "available"]

"""How much memory this process really holds, as the kernel counts it (Linux /proc).

    peak_rss_bytes()   VmHWM: the most resident memory since start (or since reset_peak_rss())
    rss_bytes()        VmRSS: resident now
    reset_peak_rss()   start VmHWM again from the current RSS (False where the kernel does not allow it)
    transport_bytes(comm)  private buffers of the same-host group channels of comm's process

These are the numbers a memory limit (a cgroup's) acts on, so a rank's own accounting of its arrays
is checked against them rather than trusted.
"""
from __future__ import annotations

import os


def _status_bytes(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                value, unit = line.split()[1:3]
                assert unit == "kB", f"/proc/{pid}/status {field} in {unit!r}"
                return int(value) * 1024
    raise OSError(f"/proc/{pid}/status has no {field} line")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    return _status_bytes("VmHWM", pid)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size now (VmRSS) of a process, in bytes."""
    return _status_bytes("VmRSS", pid)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (writing 5 to clear_refs, Linux ≥ 4.0), so a
    later peak measures one stretch of work; False if that is not possible here."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def traced_bytes() -> tuple[int, int] | None:
    """(current, peak) bytes tracemalloc sees in this process (NumPy's array buffers included), or
    None when it is not tracing."""
    import tracemalloc

    return tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else None


def transport_bytes(comm) -> int:
    """Bytes of this process's own memory that the same-host channels of `comm`'s engine keep for
    all its groups (scratch and state, runtime/shm_channel.py's GroupChannel.private_bytes; the shared
    arena is not counted); 0 for a communicator without them."""
    channels = getattr(getattr(comm, "engine", None), "channels", {})
    return sum(channel.private_bytes() for channel in list(channels.values()) if hasattr(channel, "private_bytes"))

"""The priority of the threads that run asynchronous collectives (a group channel's stream,
runtime/channel_stream.py), so that a rank's compute does not delay its own communication.

Why: data parallelism launches each gradient bucket's all_reduce on the channel's thread while
backward goes on in the main thread. With one rank per core, that thread wakes on a core already
busy with compute, and the scheduler (Linux's EEVDF) let it wait for its turn: up to 1.5 ms between
a bucket's launch and its all_reduce starting was traced (2 ranks, 2 cores), while the peer,
already in the collective, waited for it. At nice -10 the thread runs at once: `ringpipe bench
data-parallel` (dp = 2) waited 0.35-0.64 ms after backward instead of 0.7-2.4 ms, seven
interleaved pairs, weak-scaling efficiency median 93 % against 91.5 %.

`comm_thread_nice()`: RINGPIPE_COMM_THREAD_NICE (an integer from -20 to 19, or "off": leave the
thread as it starts), else DEFAULT_RAISE below the process's own nice; a ValueError names the variable
otherwise. Only while this job's ranks on the host have a core each (runtime/channel_stream.py):
where they outnumber cores, a peer may need this core more than this thread does. An explicit value
that may not be set is said once (`say_refused`).
`apply(nice)`: set it for the calling thread (Linux's setpriority on a thread id changes that thread
only). A nice below the thread's own needs CAP_SYS_NICE or RLIMIT_NICE (a container's root lacks
CAP_SYS_NICE unless it was granted: Docker's default set has not); without it the thread keeps the
process's priority, and `apply` says so by returning False.
`as_process()`: the calling thread back at the process's priority for a while, for what it starts
(a child process, a thread inherits the nice of the thread that starts it): runtime/c_library.py's
compiler, run from the channel's thread when that is where a C helper is first used.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading

from ringpipe.runtime import env_setting

DEFAULT_RAISE = 10  # by default: this much below the process's own nice (-10 for a process at 0)


def _threads_settable() -> bool:
    """Whether a thread's own priority can be set here: Linux only (elsewhere PRIO_PROCESS takes a
    process id; a thread id may name another process, or not fit a C int: macOS's)."""
    return sys.platform.startswith("linux") and hasattr(os, "setpriority") and hasattr(threading, "get_native_id")


_said: list = []


def say_refused(nice: int | None) -> None:
    """Warn once per process that a nice RINGPIPE_COMM_THREAD_NICE asked for could not be set (the
    default's refusal is expected without CAP_SYS_NICE, and stays quiet)."""
    if nice is None or _said or env_setting.setting("RINGPIPE_COMM_THREAD_NICE") is None:
        return
    _said.append(nice)
    logging.getLogger("ringpipe").warning(
        "RINGPIPE_COMM_THREAD_NICE=%d: not permitted here (it needs CAP_SYS_NICE or RLIMIT_NICE); the "
        "channel threads keep the process's priority", nice)


def process_nice() -> int:
    """The process's nice: its main thread's (on Linux getpriority of a thread id is that thread's)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, os.getpid()) if hasattr(os, "getpriority") else 0
    except OSError:
        return 0


@functools.lru_cache(maxsize=None)
def comm_thread_nice() -> int | None:
    """The nice value for communication threads (None: leave them): RINGPIPE_COMM_THREAD_NICE, else
    DEFAULT_RAISE below the process's nice (at least -20): relative, so a job started at nice 19 runs
    them at 9, not above the rest of the machine (one started at nice 0..9 does run them above it). Raises ValueError naming the variable for anything but an integer in -20..19
    or "off"."""
    value = env_setting.setting("RINGPIPE_COMM_THREAD_NICE")
    if value == env_setting.OFF:
        return None
    return max(-20, process_nice() - DEFAULT_RAISE) if value is None else value


def apply(nice: int | None) -> bool:
    """Give the calling thread `nice` (None: nothing); False where that is not permitted or not Linux.
    Never raises: it runs first on the channel's thread, and a thread dead there would leave every
    asynchronous collective of the group waiting."""
    if nice is None:
        return True
    if not _threads_settable():
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, OverflowError, ValueError):  # EPERM / EACCES: no CAP_SYS_NICE, RLIMIT_NICE does not reach it
        return False
    return True


@contextlib.contextmanager
def as_process():
    """The calling thread at the process's own nice (its main thread's) inside the block, its own
    again after: what it starts meanwhile does not inherit a nice `apply` gave it. Nothing where
    the thread has the process's nice already, or where that cannot be set."""
    changed = None
    if _threads_settable():
        try:
            me = threading.get_native_id()
            own, process = os.getpriority(os.PRIO_PROCESS, me), process_nice()
            if own != process:
                os.setpriority(os.PRIO_PROCESS, me, process)
                changed = (me, own)
        except (OSError, OverflowError, ValueError):  # (not permitted)
            changed = None
    try:
        yield
    finally:
        if changed is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, *changed)
            except OSError:  # (as apply: the thread keeps the process's priority)
                pass


__all__ = ["comm_thread_nice", "process_nice", "say_refused", "apply", "as_process",
           "DEFAULT_RAISE"]

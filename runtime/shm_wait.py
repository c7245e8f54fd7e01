"""Waiting for a counter in shared memory to reach a value, without burning a core meanwhile.

Same-host ranks signal each other through 64-bit counters in their arenas (runtime/shm_channel.py).
A waiter spins for a short, adaptive while (a peer on another core usually answers within
microseconds), then sleeps in the kernel on a futex on the counter until a publisher wakes it or
a timeout slice ends, so four ranks on two cores do not take time from the rank they wait for.

Three ways to do it, the first that works here (or the one `RINGPIPE_SHM_WAIT` names):
- "c": a small C helper (runtime/csrc/shm_wait.c, with shm_small.c's one-call rounds), compiled on first use with the machine's C
  compiler and cached under `$RINGPIPE_CACHE` (default ~/.cache/ringpipe); it spins and sleeps
  without the GIL, and wakes only when someone sleeps.
- "syscall": the same futex through ctypes' `syscall()`, from Python (every publish wakes).
- "poll": looking at the counter with growing sleeps (no futex: any POSIX system).

How long to spin (`Spin`) adapts to the waits and to the machine: spinning pays only while a core
is spare, i.e. the peer is running elsewhere, or while the runnable tasks are this job's own ranks
(more ranks than cores: a waiter yields its core to a peer rank between looks). When other jobs
keep every core busy, a spinning waiter takes the core from its peer or from them and only delays
the answer (measured at load 8-15 on 2 cores: a futex ping-pong took 13-16 µs one way without
spinning, 35 µs with a 20 µs spin, 127 µs with a 100 µs spin), so then it sleeps at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
import time

from ringpipe.runtime import c_library, cpu_binding, stream_choice

# The waits, and one round of a small collective built on them (runtime/shm_small.py).
SOURCES = ("shm_wait.c", "shm_small.c", "shm_reduce_chunks.c", "reduce_sum.c", "stream_choice.c")  # in runtime/csrc/
MODES = ("c", "syscall", "poll")
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}

# A peer on another core answers within microseconds: spin at least MIN while a core is spare, at
# most MAX (beyond that a sleep and a wake cost less than the spin).
MIN_SPIN_NS, MAX_SPIN_NS = 1_000, 100_000
# With more of this job's ranks than cores, a spinning waiter holds a core a peer needs to reach
# the point it waits for (sched_yield hands the core over only to a task queued on the same core):
# spin at most this long, then sleep, which frees the core outright.
MAX_OVERSUBSCRIBED_SPIN_NS = 20_000
SPARE_CHECK_NS = 20_000_000  # how often a waiter looks at the machine's runnable tasks
# ... and how soon again after a look found no core spare: one more task runnable for a moment (a
# thread waking, a kernel worker) turned the spin off for a whole SPARE_CHECK_NS, and a 2-rank 1 KiB
# all_reduce then took ~23 us instead of ~11 for every operation of those 20 ms (runs of
# `bench collectives` split into the two, at random, per size).
SPARE_RECHECK_NS = 1_000_000
LOADAVG = "/proc/loadavg"

_lock = threading.Lock()
_waiters: dict = {}
_errors: dict = {}


def _build_library() -> ctypes.CDLL:
    """The waiting and small-round helpers, compiled into one library (runtime/c_library.py)."""
    lib = c_library.build("shm_wait", sources=SOURCES)
    u64, i64, p = ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p
    lib.rp_wait_at_least.argtypes, lib.rp_wait_at_least.restype = [p, p, u64, i64, ctypes.c_int, i64], u64
    lib.rp_publish.argtypes, lib.rp_publish.restype = [p, p, u64], None
    lib.rp_wake.argtypes, lib.rp_wake.restype = [p], None
    lib.rp_small_round.argtypes, lib.rp_small_round.restype = [p], ctypes.c_int
    lib.rp_reduce_chunks.argtypes, lib.rp_reduce_chunks.restype = [p], ctypes.c_int
    stream_choice.declare(lib)
    return lib


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _load(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


class CWaiter:
    """Spins and sleeps in the compiled helper (the GIL is released meanwhile)."""

    mode = "c"

    def __init__(self):
        self._lib = _build_library()

    def wait_at_least(self, word: int, sleepers: int, target: int, timeout_s: float, spin_ns: int, yields: bool) -> int:
        """The counter at `word` once >= target; else its value after spinning for `spin_ns`
        (yielding the core between looks when `yields`) and one sleep of at most `timeout_s`,
        which a publish or a `wake` ends early. Callers loop."""
        return self._lib.rp_wait_at_least(word, sleepers, target, spin_ns, int(yields), int(timeout_s * 1e9))

    def publish(self, word: int, sleepers: int, value: int):
        self._lib.rp_publish(word, sleepers, value)

    def wake(self, word: int):
        self._lib.rp_wake(word)


class SyscallWaiter:
    """The futex from Python through libc's `syscall()`; publishing always wakes (no atomic
    sleeper count from Python)."""

    mode = "syscall"

    def __init__(self):
        number = _SYS_FUTEX.get(platform.machine())
        libc_name = ctypes.util.find_library("c")
        if number is None or platform.system() != "Linux" or libc_name is None:
            raise RuntimeError(f"no futex system call known on {platform.system()} {platform.machine()}")
        self._libc = ctypes.CDLL(libc_name, use_errno=True)
        self._syscall = self._libc.syscall
        self._number = number

    def wait_at_least(self, word: int, sleepers: int, target: int, timeout_s: float, spin_ns: int, yields: bool) -> int:
        spin_end = time.perf_counter_ns() + min(spin_ns, 20_000)  # looks from Python are slow: spin little
        while True:
            value = _load(word)
            if value >= target or time.perf_counter_ns() >= spin_end:
                break
        if value >= target or timeout_s <= 0:
            return value
        ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))  # one sleep, as the C helper's
        self._syscall(ctypes.c_long(self._number), ctypes.c_void_p(word), ctypes.c_int(_FUTEX_WAIT),
                      ctypes.c_uint32(value & 0xFFFFFFFF), ctypes.byref(ts), None, ctypes.c_int(0))
        return _load(word)

    def publish(self, word: int, sleepers: int, value: int):
        ctypes.c_uint64.from_address(word).value = value
        self.wake(word)

    def wake(self, word: int):
        self._syscall(ctypes.c_long(self._number), ctypes.c_void_p(word), ctypes.c_int(_FUTEX_WAKE),
                      ctypes.c_int(2**31 - 1), None, None, ctypes.c_int(0))


class PollWaiter:
    """No futex: looks at the counter with sleeps that grow from 20 µs to 1 ms."""

    mode = "poll"

    def wait_at_least(self, word: int, sleepers: int, target: int, timeout_s: float, spin_ns: int, yields: bool) -> int:
        deadline = time.monotonic() + timeout_s
        pause = 20e-6
        while True:
            value = _load(word)
            left = deadline - time.monotonic()
            if value >= target or left <= 0:
                return value
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1e-3)

    def publish(self, word: int, sleepers: int, value: int):
        ctypes.c_uint64.from_address(word).value = value

    def wake(self, word: int):
        pass


def cores() -> int:
    """The cores this job's ranks on the host share (a bound worker's count before it was bound)."""
    return cpu_binding.host_cores()


def spare_core(own_tasks: int = 1, path: str = LOADAVG) -> bool:
    """True when the tasks that can run right now (the caller included) fit on this process's cores,
    or are no more than `own_tasks` (this job's ranks on this host, which hand the cores to each
    other), from the kernel's count in /proc/loadavg ("running/total", 4th field); True where there
    is no such count."""
    try:
        running = int(_read_small(path).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running <= max(cores(), own_tasks)


_open_files: dict = {}  # path -> a descriptor kept open (a look is one pread, not open/read/close)


def _read_small(path: str) -> bytes:
    """The first 256 bytes of a /proc file that the kernel writes anew at each read from offset 0.
    A look costs 65 µs of a channel thread's CPU through open() on a 2-vCPU VM, between two
    collectives of a data-parallel step (the caches cold), and 1.7 µs warm through pread against 12."""
    if not path.startswith("/proc/"):
        with open(path, "rb") as file:
            return file.read(256)
    fd = _open_files.get(path)
    if fd is None:
        opened = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        fd = _open_files.setdefault(path, opened)
        if fd != opened:  # another thread's came first
            os.close(opened)
    try:
        return os.pread(fd, 256, 0)
    except OSError:
        _open_files.pop(path, None)  # (closed behind this module's back: open it afresh next look)
        raise


class Spin:
    """How long one waiter spins before it sleeps (ns): doubled after a wait its spin answered,
    halved after one that had to sleep (the peer is computing or descheduled), within MIN..MAX
    (MAX_OVERSUBSCRIBED when `yields`), and 0 while no core is spare (`spare_core`, looked at
    every SPARE_CHECK_NS, and every SPARE_RECHECK_NS while none is). `yields`: yield the core between looks (more ranks than cores: a yield
    hands the core to a peer rank, cheaper than a futex wake); `own_tasks`: this job's ranks on
    this host."""

    def __init__(self, yields: bool, own_tasks: int = 1):
        self.yields, self.own_tasks = yields, own_tasks
        self.max_ns = MAX_OVERSUBSCRIBED_SPIN_NS if yields else MAX_SPIN_NS
        self._ns = self.max_ns // 4
        self._checked = -SPARE_CHECK_NS
        self._spare = True

    def ns(self) -> int:
        now = time.monotonic_ns()
        if now - self._checked >= (SPARE_CHECK_NS if self._spare else SPARE_RECHECK_NS):
            self._spare, self._checked = spare_core(self.own_tasks), now
        return self._ns if self._spare else 0

    def inside_ns(self) -> int:
        """The spin of a wait inside a collective once every member arrived in it (they are moving
        its chunks: a sleep there must be woken at each chunk): the longest, while spinning at all."""
        return self.max_ns if self.ns() else 0

    def answered(self, in_time: bool, waited_ns: int | None = None):
        """The last wait ended within the spin (`in_time`) or had to sleep, after `waited_ns` in
        all (spin, sleep and wake-up) when known. A wait that slept but ended within the most it
        may spin would have
        been caught by a longer spin (a ping-pong whose turn is a little longer than the spin;
        waking a sleeper costs tens of µs on a virtual machine): spin 1.5× that long next time.
        A longer one (the peer computes): halve it."""
        if in_time:
            self._ns = min(self._ns * 2, self.max_ns)
        elif waited_ns is not None and waited_ns <= self.max_ns:
            self._ns = min(max(self._ns, waited_ns + waited_ns // 2), self.max_ns)
        else:
            self._ns = max(self._ns // 2, MIN_SPIN_NS)


def waiter(mode: str | None = None):
    """The waiter for `mode` ("c", "syscall", "poll"), or by default the first of them that works
    here, starting at `$RINGPIPE_SHM_WAIT` (default "c"). Raises RuntimeError naming the mode when
    an explicitly requested one cannot work."""
    wanted = mode or os.environ.get("RINGPIPE_SHM_WAIT", "c").lower()
    if wanted not in MODES:
        raise ValueError(f"RINGPIPE_SHM_WAIT={wanted!r}: expected one of {', '.join(MODES)}")
    with _lock:
        for candidate in MODES[MODES.index(wanted):]:
            if candidate not in _waiters and candidate not in _errors:
                try:
                    _waiters[candidate] = {"c": CWaiter, "syscall": SyscallWaiter, "poll": PollWaiter}[candidate]()
                except Exception as exc:  # noqa: BLE001 - any failure: the next way, with the reason kept
                    _errors[candidate] = f"{candidate}: {exc}".replace("\n", " ")
            if candidate in _waiters:
                return _waiters[candidate]
            if mode is not None:
                raise RuntimeError(f"shared-memory wait mode {mode!r} is unavailable here: {_errors[candidate]}")
    raise RuntimeError("no shared-memory wait mode works here")  # unreachable: poll always works


def unavailable_reason(mode: str) -> str | None:
    """Why `mode` cannot be used here (None when it can)."""
    try:
        waiter(mode)
    except RuntimeError:
        return _errors.get(mode, "unavailable")
    return None


__all__ = ["waiter", "unavailable_reason", "MODES", "Spin", "spare_core", "CWaiter", "SyscallWaiter", "PollWaiter"]

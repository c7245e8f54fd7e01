"""A memory limit for one process, as the kernel enforces it: a memory cgroup of its own.

    limit = MemoryCgroup.create("ringpipe-bench-rank0", limit_bytes)   # under this process's cgroup
    limit.add(pid)               # the process and what it starts from now on
    limit.oom_kills              # processes the kernel's OOM killer ended in it
    limit.peak_bytes             # the most it was charged (v1 max_usage_in_bytes, v2 memory.peak)
    limit.usage()                # charged now, by kind: resident (anon + shmem + kernel) and page cache
    sampler = UsageSampler({0: limit}).start() ... sampler.stop()   # peaks of usage(), polled
    limit.remove()               # once its processes have exited

A cgroup's charge includes the page cache of the files its processes write (a checkpoint), which
the kernel reclaims when the limit is reached, so its peak says little about what the processes
needed. The kernel keeps no peak of the resident part alone: `UsageSampler` polls memory.stat.

cgroup v2 (`memory.max`, swap off by `memory.swap.max`) or v1 with the memory controller
(`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` where swap is accounted). Memory a
process already holds when it is added stays charged to its old cgroup (v2 always; v1 unless the
kernel allows `memory.move_charge_at_immigrate`), so add processes before they allocate. Never RLIMIT_AS,
which counts address space mapped (arenas, BLAS reservations) rather than memory in use.
`unavailable()` says why a limit cannot be made here (not Linux, no controller, no permission).
"""
from __future__ import annotations

import os
import threading

from ringpipe.runtime.cgroups import own_cgroup


class WorkerKilled(RuntimeError):
    """A worker's cgroup killed it (out of memory): the run failed, its flags were fine (exit 1)."""


# cgroup v2 memory.stat entries of kernel memory, before Linux 5.18 summed them as "kernel"
KERNEL_V2 = ("kernel_stack", "pagetables", "percpu", "sock", "slab", "vmalloc")


class MemoryCgroup:
    def __init__(self, path: str, version: int, limit_bytes: int):
        self.path, self.version, self.limit_bytes = path, version, limit_bytes
        # Whether memory a process holds when `add`ed is charged here (v1 where the kernel allows);
        # otherwise only what it allocates afterwards.
        self.moves_charges = False

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> "MemoryCgroup":
        """A new cgroup `name` under this process's own, limited to `limit_bytes` (memory + swap);
        OSError naming the file if the kernel refuses."""
        parent, version = own_cgroup("memory")
        path = os.path.join(parent, name)
        if version == 2:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                enabled = f.read().split()
            if "memory" not in enabled:  # let children of `parent` have memory limits
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        os.makedirs(path, exist_ok=True)
        group = cls(path, version, int(limit_bytes))
        try:
            if version == 2:
                group._write("memory.max", str(group.limit_bytes))
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    group._write("memory.swap.max", "0")
            else:
                group._write("memory.limit_in_bytes", str(group.limit_bytes))
                if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                    group._write("memory.memsw.limit_in_bytes", str(group.limit_bytes))
                try:
                    group._write("memory.move_charge_at_immigrate", "3")
                    group.moves_charges = True
                except OSError:  # not every kernel allows it: only what the process allocates later counts
                    pass
        except BaseException:
            group.remove()
            raise
        return group

    def _write(self, name: str, value: str) -> None:
        _write(os.path.join(self.path, name), value)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def add(self, pid: int) -> None:
        """Move process `pid` (and its future children) into this cgroup."""
        self._write("cgroup.procs", str(pid))

    @property
    def oom_kills(self) -> int:
        """How many processes the kernel's out-of-memory killer ended in this cgroup."""
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    @property
    def peak_bytes(self) -> int | None:
        """The most memory charged to this cgroup (None where the kernel does not keep it)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int(self._read(name))
        except (OSError, ValueError):
            return None

    def usage(self) -> dict:
        """Bytes charged now: {"anon", "shmem", "kernel", "resident": their sum, which the kernel cannot
        reclaim without swap, and "file": page cache of files, which it can}."""
        stat = {}
        for line in self._read("memory.stat").splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
        if self.version == 2:
            anon, shmem, cached = stat.get("anon", 0), stat.get("shmem", 0), stat.get("file", 0)
            kernel = stat.get("kernel", sum(stat.get(key, 0) for key in KERNEL_V2))  # "kernel" since Linux 5.18
        else:  # v1: "rss" is anonymous memory (transparent huge pages included), "cache" includes shmem
            anon, shmem, cached = stat.get("rss", 0), stat.get("shmem", 0), stat.get("cache", 0)
            try:
                kernel = int(self._read("memory.kmem.usage_in_bytes"))
            except (OSError, ValueError):
                kernel = 0
        return {"anon": anon, "shmem": shmem, "kernel": kernel, "resident": anon + shmem + kernel,
                "file": max(cached - shmem, 0)}

    def remove(self) -> None:
        """Delete the cgroup (its processes must have exited); quietly, if it is already gone."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass


class UsageSampler:
    """Polls `usage()` of the cgroups in `groups` ({key: MemoryCgroup}, read at each poll, so groups
    may come and go) every `interval` seconds on a thread; `peaks` is {key: {"resident": the most
    resident bytes seen, "file": the most page cache seen, "samples": polls}}. A spike shorter than
    the interval can be missed: the resident peak is a lower bound, the cgroup's charge peak an upper one."""

    def __init__(self, groups: dict, interval: float = 0.01):
        self.groups, self.interval, self.peaks = groups, interval, {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="cgroup-usage-sampler", daemon=True)

    def start(self) -> "UsageSampler":
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self.sample()
            self._stopping.wait(self.interval)

    def sample(self) -> None:
        for key, group in list(self.groups.items()):
            try:
                usage = group.usage()
            except (OSError, ValueError):  # removed meanwhile
                continue
            peak = self.peaks.setdefault(key, {"resident": 0, "file": 0, "samples": 0})
            peak["resident"] = max(peak["resident"], usage["resident"])
            peak["file"] = max(peak["file"], usage["file"])
            peak["samples"] += 1

    def stop(self) -> dict:
        """Stop polling (after one last sample); returns `peaks`."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        return self.peaks


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise OSError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from None


def unavailable() -> str | None:
    """Why a MemoryCgroup cannot be made here, or None when it can."""
    try:
        probe = MemoryCgroup.create(f"ringpipe-probe-{os.getpid()}", 1 << 30)
    except (OSError, ValueError, StopIteration) as exc:
        return f"no memory cgroup can be made here: {exc}"
    probe.remove()
    return None

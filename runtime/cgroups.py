"""Where this process's control groups are, and what its cpuset lets it use (Linux; cgroup v1 or v2).

`own_cgroup(controller)`: (directory of this process's cgroup for `controller`, version) from
/proc/self/cgroup and /proc/self/mountinfo; OSError where no such controller is mounted.
`cpuset_cpus()`: the CPUs this process's cpuset allows (v2 `cpuset.cpus.effective`, v1
`cpuset.effective_cpus`, from its own cgroup up to the hierarchy's root: in v2 a cgroup without
the controller enabled has no such file and takes its parent's), else the online CPUs; None where
neither can be read. A process's affinity (sched_getaffinity) may be narrower: a launcher bound it.
"""
from __future__ import annotations

import os


def own_cgroup(controller: str) -> tuple[str, int]:
    """(directory of this process's `controller` cgroup, version 1 or 2)."""
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = [path for _, controllers, path in entries if controller in controllers.split(",")]
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            kind, options = fields[separator + 1], fields[-1].split(",")
            root, mount_point = fields[3], fields[4]
            if kind == "cgroup" and controller in options:
                mounts[1] = (root, mount_point)
            elif kind == "cgroup2":
                mounts.setdefault(2, (root, mount_point))
    if v1 and 1 in mounts:
        path, version = v1[0], 1
    elif 2 in mounts:
        path, version = next(p for h, _, p in entries if h == "0"), 2
    else:
        raise OSError(f"no {controller} cgroup controller is mounted (/proc/self/mountinfo)")
    root, mount_point = mounts[version]
    relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, relative)), version


def parse_cpu_list(text: str) -> set:
    """The CPUs of a kernel CPU list such as "0-3,8,10-11"; ValueError for anything else."""
    cpus = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _read_cpus(path: str) -> set | None:
    try:
        with open(path) as f:
            return parse_cpu_list(f.read()) or None
    except (OSError, ValueError):
        return None


def cpuset_cpus() -> set | None:
    """The CPUs this process's cpuset cgroup allows, else the online ones, else None."""
    try:
        directory, version = own_cgroup("cpuset")
        name = "cpuset.cpus.effective" if version == 2 else "cpuset.effective_cpus"
        while True:
            cpus = _read_cpus(os.path.join(directory, name))
            if cpus is not None:
                return cpus
            parent = os.path.dirname(directory)
            if parent == directory or not os.path.exists(os.path.join(parent, "cgroup.procs")):
                break
            directory = parent
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return _read_cpus("/sys/devices/system/cpu/online")


__all__ = ["own_cgroup", "cpuset_cpus", "parse_cpu_list"]

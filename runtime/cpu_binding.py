"""Binding each worker to cores of its own, as OpenMPI binds the ranks of a job that fits the cores
(`--bind-to core`, its default for up to two ranks; `--cpus-per-rank`) and Slurm's `--cpu-bind=cores`.

Two ranks that move data through shared memory wait for each other many times per collective (a
2-rank 1 MiB all_reduce: four waits), so they must run at the same time. Left to the scheduler, the
two workers of a 2-rank job on a 2-core machine shared one core in 4 clusters of 12 (a waker's wake-up
brings the woken process to its own core): a 1 MiB all_reduce then took 470-570 µs instead of 60-70,
as every wait lasted until the waiter's spin or time slice ended. Bound, none of 39 did.

Local rank r of n gets the r-th of n equal blocks of the CPUs the worker may use (len // n of
them, at least one; a block per rank, so its BLAS threads, `threads_per_worker`, have their cores).
Modes (the Cluster option `cpu_bind`, else `$RINGPIPE_CPU_BIND` of the worker's host, else "auto"):
    auto   bind when this host's ranks are at least two and have a core each, and no launcher
           restricted the worker to part of the machine already (mpirun's or srun's binding, a
           cpuset: kept as it is); else leave the scheduler free (more ranks than cores: binding
           could only pin busy ranks together)
    core   bind as above in any case (blocks of one core, round robin, past one rank per core)
    none   never bind (e.g. two jobs on one host, which would both start from the first core)
Every thread of the worker is bound (BLAS starts its pool when NumPy is imported, before this);
threads it starts later inherit the binding.
A worker a launcher bound to part of its cpuset (mpirun binds each of two ranks to a core by default)
counts its job's cores on the host, not its own one, in `host_cores()`: otherwise two ranks with a
core each took themselves for ranks sharing one (their waits yielding and their copies not streamed:
a 2-rank 64 KiB all_reduce under `mpirun -np 2` took 20-34 µs instead of 12-14, 256 KiB 40-45
instead of 30-35; 1 and 4 MiB alike within the noise).
"""
from __future__ import annotations

import os

from ringpipe.runtime import cgroups

MODES = ("auto", "core", "none")
ENV = "RINGPIPE_CPU_BIND"
_unbound_cores: list = []  # how many CPUs this process could use before bind() narrowed them to its block


def mode_from(option: str | None, environ=None) -> str:
    """The binding mode: `option` (a Cluster's), else $RINGPIPE_CPU_BIND, else "auto". Raises
    ValueError naming the option or the variable for anything but MODES."""
    if option is not None:
        if option not in MODES:
            raise ValueError(f"Cluster option cpu_bind={option!r} is out of range: expected one of {list(MODES)}")
        return option
    given = (os.environ if environ is None else environ).get(ENV, "").strip()
    if given and given.lower() not in MODES:
        raise ValueError(f"{ENV}={given!r}: expected one of {', '.join(MODES)}")
    return given.lower() or "auto"


def cores_for(mode: str, local_rank: int, local_world_size: int, allowed, machine: int | None = None) -> list | None:
    """The CPUs that local rank `local_rank` of `local_world_size` binds to among `allowed` (the CPUs
    this process may run on, of the `machine`'s; default: all of them), or None: see the module
    docstring."""
    cpus = sorted(allowed)
    if mode == "none" or not cpus or not 0 <= local_rank < local_world_size:
        return None
    if mode == "auto" and not (2 <= local_world_size <= len(cpus) and len(cpus) >= (machine or len(cpus))):
        return None
    block = max(1, len(cpus) // local_world_size)
    first = local_rank % (len(cpus) // block) * block  # (round robin past the last block)
    return cpus[first:first + block]


def launcher_bound_cores(allowed, local_world_size: int, whole) -> int | None:
    """The CPUs of this job's ranks on the host where a launcher bound this rank to `allowed`, part
    of the `whole` its cpuset lets it use: `local_world_size` such blocks, at most `whole` (mpirun binds
    each of up to two ranks to a core of its own by default, srun --cpu-bind=cores likewise). None
    where `allowed` is all of `whole`: a cpuset that confines the job, shared by its ranks."""
    allowed, whole = set(allowed), set(whole or ())
    if not allowed or not allowed < whole:
        return None
    return min(len(whole), len(allowed) * max(1, local_world_size))


def bind(mode: str, local_rank: int | None, local_world_size: int | None) -> list | None:
    """Bind every thread of this process (and so those it starts later) as `mode` says; returns the
    CPUs, or None where it stays as it was (no local rank known). A worker a launcher bound counts
    its job's cores on the host (`launcher_bound_cores`), not its own, in `host_cores()`. An OSError
    (a cpuset changed meanwhile) leaves whatever was bound so far and is raised for the caller to say."""
    if local_rank is None or local_world_size is None or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    cpus = cores_for(mode, local_rank, local_world_size, allowed, os.cpu_count())
    if cpus is None:
        job = launcher_bound_cores(allowed, local_world_size, cgroups.cpuset_cpus())
        if job is not None:
            _unbound_cores[:] = [job]
    else:
        _unbound_cores[:] = [len(allowed)]
        for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
            try:
                os.sched_setaffinity(int(task), cpus)
            except ProcessLookupError:  # (a thread that ended meanwhile)
                pass
    return cpus


def host_cores() -> int:
    """The CPUs this job's ranks on the host share: this process's, or before bind() gave it one,
    or its job's where a launcher bound it (whether the ranks outnumber the cores is a question
    about all of them, runtime/shm_wait.py)."""
    if _unbound_cores:
        return _unbound_cores[0]
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_position(boot: dict, environ=None) -> tuple[int | None, int | None]:
    """(local rank, ranks on this host): the boot record's (runtime/launch.py's LocalLauncher puts
    them there), else LOCAL_RANK and LOCAL_WORLD_SIZE from the environment, else (None, None)."""
    if boot.get("local_rank") is not None and boot.get("local_world_size") is not None:
        return int(boot["local_rank"]), int(boot["local_world_size"])
    environ = os.environ if environ is None else environ
    try:
        return int(environ["LOCAL_RANK"]), int(environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None, None


__all__ = ["MODES", "ENV", "mode_from", "cores_for", "launcher_bound_cores", "bind", "host_cores", "local_position"]

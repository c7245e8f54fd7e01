"""Binding each worker to a core of its own, as OpenMPI binds the ranks of a job that fits the cores
(`--bind-to core`, its default for up to two ranks) and Slurm's `--cpu-bind=cores`.

Two ranks that move data through shared memory wait for each other many times per collective (a
2-rank 1 MiB all_reduce: four waits), so they must run at the same time. Left to the scheduler, the
two workers of a 2-rank job on a 2-core machine shared one core in 4 clusters of 9 (a waker's wake-up
brings the woken process to its own core): a 1 MiB all_reduce then took 470-570 µs instead of 60-70,
as every wait lasted until the waiter's spin or time slice ended. Bound, none of 25 did.

Modes (the Cluster option `cpu_bind`, else `$RINGPIPE_CPU_BIND`, else "auto"):
    auto   bind when this host's ranks are at least two and have a core each; else leave the
           scheduler free (more ranks than cores: binding could only pin two busy ranks together)
    core   bind local rank r to the r-th core this process may use (round robin past the last)
    none   never bind (e.g. two jobs on one host, which would both start from the first core)
A launcher that bound the worker already (mpirun, srun --cpu-bind) leaves it fewer cores than the
host's ranks: "auto" keeps that binding. Threads the worker starts later (its engine, a channel's
thread, BLAS) inherit the binding.
"""
from __future__ import annotations

import os

MODES = ("auto", "core", "none")
ENV = "RINGPIPE_CPU_BIND"
_unbound_cores: list = []  # how many CPUs this process could use before bind() narrowed it to one


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


def core_for(mode: str, local_rank: int, local_world_size: int, allowed) -> int | None:
    """The CPU that local rank `local_rank` of `local_world_size` binds to among `allowed` (the CPUs
    this process may run on), or None: see the module docstring."""
    cpus = sorted(allowed)
    if mode == "none" or not cpus or not 0 <= local_rank < local_world_size:
        return None
    if mode == "auto" and not 2 <= local_world_size <= len(cpus):
        return None
    return cpus[local_rank % len(cpus)]


def bind(mode: str, local_rank: int | None, local_world_size: int | None) -> int | None:
    """Bind this process (its calling thread and the threads it starts later) as `mode` says;
    returns the CPU, or None where it stays as it was (no local rank known: a launcher that
    does not say, such as mpirun, which binds itself)."""
    if local_rank is None or local_world_size is None or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    core = core_for(mode, local_rank, local_world_size, allowed)
    if core is not None:
        os.sched_setaffinity(0, {core})
        _unbound_cores[:] = [len(allowed)]
    return core


def host_cores() -> int:
    """The CPUs this job's ranks on the host share: this process's, or before bind() gave it one
    (whether the ranks outnumber the cores is a question about all of them, runtime/shm_wait.py)."""
    if _unbound_cores:
        return _unbound_cores[0]
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_position(environ=None) -> tuple[int | None, int | None]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) from the environment a launcher gave (runtime/launch.py's
    conventional_env), or (None, None)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ["LOCAL_RANK"]), int(environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None, None


__all__ = ["MODES", "ENV", "mode_from", "core_for", "bind", "host_cores", "local_position"]

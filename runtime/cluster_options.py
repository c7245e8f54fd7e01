"""The checks of `Cluster`'s options, made before any worker starts.

A bad option found late costs a minute or repeats on every call (an arena too small for one block
stalls the first collective until its timeout; a timeout of 0 fails every operation), so each is
checked here: one ValueError naming the option, its value and the allowed range.
"""
from __future__ import annotations

import math
import os

from ringpipe.runtime import cpu_binding, env_setting

MIN_ARENA_BYTES = 1 << 20  # the pair rings take a quarter; the rest holds channels and blocks
ALGORITHMS = ("auto", "direct", "ring", "shm")
COMM_OPTIONS = {"direct_max_bytes": 0, "chunk_bytes": 1, "round_bytes": 1}  # option -> its least value


def _number(name, value, low, *, above=False, integer=False, optional=False):
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and not (isinstance(value, float) and math.isnan(value))
    ok = ok and (value > low if above else value >= low)
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"above {low}" if above else f"at least {low}"
        raise ValueError(f"Cluster option {name}={value!r} is out of range: expected {kind} {bound}"
                         + (" (or None)" if optional else ""))


def check_cluster_options(world_size, timeout, shm, algorithm, threads_per_worker, bind_host, start_timeout,
                          arena_bytes, env, heartbeat_interval, heartbeat_timeout, stuck_grace, log_dir,
                          restart_count, comm_options, cpu_bind=None) -> None:
    """Raise ValueError for the first option of `Cluster(...)` out of its range (see Cluster.__init__)."""
    _number("world_size", world_size, 1, integer=True)
    for name, value in (("timeout", timeout), ("start_timeout", start_timeout),
                        ("heartbeat_interval", heartbeat_interval), ("heartbeat_timeout", heartbeat_timeout)):
        _number(name, value, 0, above=True)
    _number("stuck_grace", stuck_grace, 0)
    if not isinstance(shm, bool):
        raise ValueError(f"Cluster option shm={shm!r} is out of range: expected True or False")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Cluster option algorithm={algorithm!r} is out of range: expected one of {list(ALGORITHMS)}")
    _number("threads_per_worker", threads_per_worker, 1, integer=True, optional=True)
    if not isinstance(bind_host, str) or not bind_host:
        raise ValueError(f"Cluster option bind_host={bind_host!r} is out of range: expected a host name or address")
    _number("arena_bytes", arena_bytes, MIN_ARENA_BYTES, integer=True)
    if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                for k, v in env.items())):
        raise ValueError(f"Cluster option env={env!r} is out of range: expected a dict of strings to strings (or None)")
    env_setting.check({**os.environ, **(env or {})})  # the workers' tuning variables (runtime/env_setting.py)
    cpu_binding.mode_from(cpu_bind, {**os.environ, **(env or {})})  # (the workers' binding, runtime/cpu_binding.py)
    if log_dir is not None and not isinstance(log_dir, (str, bytes)) and not hasattr(log_dir, "__fspath__"):
        raise ValueError(f"Cluster option log_dir={log_dir!r} is out of range: expected a path (or None)")
    _number("restart_count", restart_count, 0, integer=True)
    if not heartbeat_interval < heartbeat_timeout:
        raise ValueError(f"Cluster option heartbeat_interval={heartbeat_interval!r} is out of range: expected "
                         f"below heartbeat_timeout={heartbeat_timeout!r}")
    for name, value in comm_options.items():
        if name not in COMM_OPTIONS:
            raise ValueError(f"Cluster option {name}={value!r} is unknown; expected one of the documented options "
                             f"or {sorted(COMM_OPTIONS)}")
        _number(name, value, COMM_OPTIONS[name], integer=True)


__all__ = ["check_cluster_options", "MIN_ARENA_BYTES"]

"""Refuse a run whose planned memory does not fit this host, before anything is tokenized or started.

The planner (model/planning/memory.py) predicts each rank's peak; the ranks this host runs add up. The
host has what the kernel would give without swapping: /proc/meminfo's MemAvailable, and less where the
process's cgroup sets a lower limit (a container, a batch job). A machine with swap may hold more, so
`--no-memory-check` skips the check.
"""
from __future__ import annotations

import os

from ringpipe.cluster.options import usage_error

# The model's vocabulary is known only after tokenizing; a smaller one can only plan less memory, so
# a refusal made with it holds whatever the tokenizer gives.
_VOCAB_AT_LEAST = {"byte": 256}


def available_bytes() -> int | None:
    """Bytes this process may still allocate without swapping: MemAvailable, capped by the cgroup's
    limit less its usage (v2 memory.max, v1 memory.limit_in_bytes); None where neither is known."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        for group in _cgroup_dirs():
            try:
                with open(os.path.join(group, limit_file)) as f:
                    limit = f.read().strip()
                with open(os.path.join(group, usage_file)) as f:
                    usage = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < 1 << 60:  # "max" or v1's huge number: no limit
                found.append(max(0, int(limit) - usage))
    return min(found) if found else None


def _cgroup_dirs() -> list[str]:
    """This process's cgroup directories (v2's unified one, v1's memory controller's)."""
    dirs = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers in ("", "memory") or "memory" in controllers.split(","):
                    base = "/sys/fs/cgroup" if controllers == "" else "/sys/fs/cgroup/memory"
                    dirs.append(os.path.join(base, path.lstrip("/")))
    except (OSError, ValueError):
        pass
    return dirs


def host_bytes(config, layout, local_ranks: int) -> int | None:
    """The planned peak bytes of this host's `local_ranks` processes (1 for a single-process run);
    None when the planner does not know the model or the layout (an explicit split)."""
    from ringpipe.cluster.plan_report import planned_memory

    vocab = config.bpe_vocab_size or _VOCAB_AT_LEAST.get(config.tokenizer, 2)
    planned = planned_memory(config, layout, vocab)
    if planned is None:
        return None
    memory = planned[1]
    # each pipeline rank's entry stands for its dp × tp ranks; spread evenly over the hosts
    per_rank = [m.peak for m in memory for _ in range(layout.dp * layout.tp)]
    return int(sum(sorted(per_rank, reverse=True)[:local_ranks]))


def check_fits(config, layout, local_ranks: int, flags: str) -> None:
    """A usage error (exit 2) when the planned memory of this host's ranks exceeds what it has;
    `flags` names the flags that size the run, for the message."""
    from ringpipe.cluster.plan_cmd import size

    need = host_bytes(config, layout, local_ranks)
    have = available_bytes()
    if need is None or have is None or need <= have:
        return
    ranks = f"{local_ranks} processes" if local_ranks > 1 else "one process"
    raise usage_error(f"{flags} need about {size(need)} of memory on this host ({ranks}, planned), "
                      f"{size(have)} is available (MemAvailable / cgroup limit); make the model, "
                      f"--block-size or --batch-size smaller, or pass --no-memory-check to try anyway")

"""Which host runs which rank: tensor-parallel groups inside one host whenever the slots allow.

The mesh numbers ranks with tensor parallelism fastest (runtime rank = (pp·dp + dp_index)·tp +
tp_index, see model/parallel/mesh.py), so a tensor-parallel group is `tp` consecutive ranks. Its
all-reduces run on every layer, forward and backward: they must stay on a host's shared memory,
while data- and pipeline-parallel traffic, far rarer, may cross the network.
"""
from __future__ import annotations


class PlacementError(ValueError):
    """The hosts' slots cannot hold the run."""


def place_ranks(slots: list[int], world_size: int, tp: int = 1) -> list[int]:
    """The host index (into `slots`, each host's worker count) of every rank 0..world_size-1.

    Whole tensor-parallel groups go to the first host with room for all of them; only when no host
    has room left for a whole group are its ranks spread over the remaining slots. Raises
    `PlacementError` when the slots add up to fewer than `world_size`."""
    if sum(slots) < world_size:
        raise PlacementError(f"the hosts have {sum(slots)} slots, too few for {world_size} workers")
    if tp < 1 or world_size % tp:
        raise PlacementError(f"{world_size} workers do not form tensor-parallel groups of {tp}")
    free = list(slots)
    hosts: list[int] = []
    for _ in range(world_size // tp):
        whole = next((h for h, room in enumerate(free) if room >= tp), None)
        for _ in range(tp):
            host = whole if whole is not None else next(h for h, room in enumerate(free) if room > 0)
            free[host] -= 1
            hosts.append(host)
    return hosts


def describe_placement(hosts: list[int], names: list[str], tp: int = 1) -> list[str]:
    """One line per host that runs workers: its name, its ranks, and the tensor-parallel groups
    that span hosts (none when the slots allowed)."""
    lines = []
    named = [names[host] for host in hosts]  # mpirun and srun may start several agents on one host
    for name in sorted(set(named), key=named.index):  # hosts in the order of their first rank
        lines.append(f"  {name}: ranks {_ranges([r for r, host in enumerate(named) if host == name])}")
    split = [g for g in range(len(hosts) // tp) if len(set(hosts[g * tp:(g + 1) * tp])) > 1]
    if tp > 1:
        lines.append(f"  tensor-parallel groups of {tp}: " + ("all inside one host" if not split else
                     f"{len(split)} span hosts (give hosts slots in multiples of {tp} to avoid it)"))
    return lines


def _ranges(ranks: list[int]) -> str:
    parts, start = [], ranks[0]
    for previous, rank in zip(ranks, ranks[1:] + [None]):
        if rank != previous + 1:
            parts.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = rank
    return ",".join(parts)

"""Which replica writes each tensor that data-parallel replicas (and tensor-parallel peers) hold alike.

Each rank of a stage's dp × tp block decides alone, from facts every rank of the block shares (the
parameter names and their global shapes), so they agree without communicating. Assigning tensors
in turn over sorted names was unbalanced: GPT-2's names alternate `*.bias` / `*.weight`, so with
dp 2 one replica wrote every bias and the other every weight (28 KB against 343 KB). Here tensors
go largest first to the least-loaded writer (ties: the lowest index, then the name), which keeps
the bytes per writer within one tensor of each other.

A tensor that tensor parallelism splits is written by one data-parallel row (every tp rank of it
writes its slice); one that tp replicates, by one cell of the block. With ZeRO-1 every rank writes
its own shard of the moments, except that a tp-replicated parameter's moments (alike on the tp
peers) are written by one tp column, chosen the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WriterPlan:
    """`weights[name]`: (dp rank, tp rank or None for every tp rank) that writes the tensor (and,
    without ZeRO, its moments); `moments[name]`: the tp rank that writes a tp-replicated tensor's
    ZeRO-1 moments; `loads[d][t]`: the bytes the plan gives rank (d, t), as estimated."""

    weights: dict = field(default_factory=dict)
    moments: dict = field(default_factory=dict)
    loads: list = field(default_factory=list)


def plan_writers(tensors: list, dp: int, tp: int, zero: bool) -> WriterPlan:
    """`tensors`: (name, bytes of the whole tensor, replicated over tp) for each tensor the block
    holds alike; the same list on every rank of the block (order does not matter)."""
    loads = np.zeros((dp, tp))
    plan = WriterPlan()
    jobs = []  # (bytes per writer, name, kind)
    for name, nbytes, replicated in tensors:
        copies = 1 if zero else 3  # the weight, and without ZeRO its two Adam moments
        if replicated:
            jobs.append((copies * nbytes, name, "cell"))
            if zero:
                jobs.append((2 * nbytes / dp, name, "column"))  # its moment shard on every dp rank
        else:
            jobs.append((copies * nbytes / tp, name, "row"))
            if zero:
                loads += 2 * nbytes / tp / dp  # every rank writes its shard of the moments: no choice
    for cost, name, kind in sorted(jobs, key=lambda job: (-job[0], job[1], job[2])):
        if kind == "cell":
            d, t = np.unravel_index(int(np.argmin(loads)), loads.shape)
            loads[d, t] += cost
            plan.weights[name] = (int(d), int(t))
        elif kind == "row":
            d = int(np.argmin(loads.max(axis=1)))
            loads[d] += cost
            plan.weights[name] = (d, None)
        else:
            t = int(np.argmin(loads.max(axis=0)))
            loads[:, t] += cost
            plan.moments[name] = t
    plan.loads = loads.tolist()
    return plan


def writes(plan: WriterPlan, name: str, dp_rank: int, tp_rank: int) -> bool:
    """Whether rank (dp_rank, tp_rank) writes tensor `name` (and, without ZeRO, its moments)."""
    d, t = plan.weights[name]
    return d == dp_rank and (t is None or t == tp_rank)


__all__ = ["WriterPlan", "plan_writers", "writes"]

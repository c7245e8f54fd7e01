"""A pipeline schedule's timing for many cost tables: the simulator proves the schedule once, then
each cost table is one pass over its actions.

    timing = compiled_schedule("1f1b", pp, microbatches, virtual_stages)
    makespan, bubble_fraction = timing.run(costs, latency)    # costs: {stage: {Kind: seconds}}

The planner times thousands of layouts, most of them on a few dozen schedules; the simulator's
checks (every send matched, no deadlock, every micro-batch complete) do not depend on the costs, so
they run once per schedule. `run` keeps the simulator's rules: a compute action takes its cost on its
rank's clock, a send makes its payload available `latency` later, a receive waits for it; the
result equals `simulate(...)`'s makespan and bubble (tests/test_plan_speed.py).
"""
from __future__ import annotations

import functools

from ringpipe.model.parallel.pipeline_parallel.schedules import COMPUTE, RECEIVES, SENDS
from ringpipe.model.parallel.pipeline_parallel.simulator import simulate
from ringpipe.model.planning.memory import schedule_of

COMPUTE_OP, SEND_OP, RECEIVE_OP = range(3)


class CompiledSchedule:
    """The actions of every rank in an order that respects every send → receive, each as
    (rank, op, index of its (stage, kind) in `keys` or of its channel, None); the optimizer step
    costs nothing here (the planner adds it after the pipeline)."""

    def __init__(self, schedule: list):
        simulate(schedule)  # raises ScheduleError for an unsound schedule
        self.num_ranks = len(schedule)
        channels, keys, position, ops = {}, {}, [0] * len(schedule), []
        sent = set()
        progress = True
        while progress:  # as the simulator walks: each rank runs until it waits for a message
            progress = False
            for rank, actions in enumerate(schedule):
                while position[rank] < len(actions):
                    action = actions[position[rank]]
                    if action.kind in SENDS or action.kind in RECEIVES:
                        channel = channels.setdefault(action.channel, len(channels))
                        if action.kind in RECEIVES and channel not in sent:
                            break
                        if action.kind in SENDS:
                            sent.add(channel)
                        ops.append((rank, SEND_OP if action.kind in SENDS else RECEIVE_OP, channel, None))
                    elif action.kind in COMPUTE and action.stage is not None:
                        ops.append((rank, COMPUTE_OP, keys.setdefault((action.stage, action.kind), len(keys)), None))
                    position[rank] += 1
                    progress = True
        self.ops, self.num_channels, self.keys = ops, len(channels), list(keys)

    def run(self, costs: dict, latency: float = 0.0) -> tuple[float, float]:
        """(makespan, bubble fraction) with `costs` {stage: {Kind: seconds}} (missing: 0)."""
        clock, busy = [0.0] * self.num_ranks, [0.0] * self.num_ranks
        available = [0.0] * self.num_channels
        table = [costs[stage].get(kind, 0.0) for stage, kind in self.keys]
        for rank, op, where, _ in self.ops:
            if op == COMPUTE_OP:
                seconds = table[where]
                clock[rank] += seconds
                busy[rank] += seconds
            elif op == SEND_OP:
                available[where] = clock[rank] + latency
            elif available[where] > clock[rank]:
                clock[rank] = available[where]
        makespan = max(clock) if clock else 0.0
        idle = sum(makespan - b for b in busy)
        return makespan, (idle / (self.num_ranks * makespan) if makespan else 0.0)


@functools.lru_cache(maxsize=1024)
def compiled_schedule(name: str, pp: int, microbatches: int, virtual_stages: int) -> CompiledSchedule:
    return CompiledSchedule(schedule_of(name, pp, microbatches, virtual_stages))


@functools.lru_cache(maxsize=1 << 14)
def pipeline_time(schedule_key: tuple, stage_costs: tuple, latency: float) -> tuple[float, float]:
    """`compiled_schedule(*schedule_key).run(...)` with `stage_costs` ((stage, ((Kind, seconds), ...)), ...),
    remembered: layouts that differ only after the pipeline (ZeRO, the optimizer) share it."""
    return compiled_schedule(*schedule_key).run({stage: dict(costs) for stage, costs in stage_costs}, latency)

"""A dry run of pipeline schedules: check the action lists and time them, without a model.

`simulate(schedule, costs, latency)` walks every rank's list as an executor would: a compute action
takes its cost, a send makes its payload available to the peer `latency` later (sends never
block), a receive waits until its matching send happened. On the way it proves the schedule sound
and raises `ScheduleError` naming the rank, the action and what was wrong otherwise:

* every send has exactly one matching receive, on the right peers, and vice versa;
* no deadlock (the error lists, per stuck rank, the action it waits on);
* a forward of (mb, stage) has its input and precedes its backward; a backward has the gradient
  of its output; B (input grad) precedes W (weight grad) of the same (mb, stage); every
  (mb, stage) gets exactly one forward and one full or split backward;
* OPTIMIZER_STEP comes once per rank, after all the weight gradients of its stages.

`SimulationResult` reports the makespan, per-rank busy and idle time, the bubble fraction and the
peak number of in-flight activations (forwards whose input-gradient has not run yet) per rank and
per stage. `format_timeline(result)` draws it as text — a teaching tool.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ringpipe.model.parallel.pipeline_parallel.schedules import COMPUTE, RECEIVES, SENDS, SCHEDULES, Action, Kind, stage_rank

# Unit costs: the split backward's B and W together cost the full backward.
UNIT_COSTS = {Kind.FORWARD: 1.0, Kind.BACKWARD: 2.0, Kind.BACKWARD_INPUT: 1.0, Kind.BACKWARD_WEIGHT: 1.0,
              Kind.OPTIMIZER_STEP: 0.0}


class ScheduleError(ValueError):
    """A schedule that would fail or hang on a real pipeline."""


@dataclass
class SimulationResult:
    num_ranks: int
    makespan: float
    busy: list  # per rank: time spent computing
    idle: list  # per rank: makespan − busy
    # per rank: max forwards whose input gradient has not run yet (with v > 1 these are chunk
    # activations, each about 1/v of a v = 1 stage's)
    peak_in_flight: list
    peak_in_flight_per_stage: dict  # stage -> the same count for that stage alone
    timeline: list = field(repr=False)  # per rank: (start, end, action) of compute actions

    @property
    def bubble_fraction(self) -> float:
        """Idle time over total time, summed over all ranks: Σ idle / (p · makespan)."""
        total = self.num_ranks * self.makespan
        return sum(self.idle) / total if total else 0.0


def _cost_function(costs):
    if costs is None:
        costs = UNIT_COSTS
    if callable(costs):
        return costs
    table = {**UNIT_COSTS, **{Kind(k): float(c) for k, c in costs.items()}}
    return lambda rank, action: table.get(action.kind, 0.0)


def simulate(schedule: list[list[Action]], costs=None, latency: float = 0.0) -> SimulationResult:
    """Run `schedule` (one action list per pipeline rank) and return its timing.

    costs: None (UNIT_COSTS), a mapping Kind -> seconds (missing kinds keep their unit cost;
    sends and receives cost 0), or a function (rank, action) -> seconds, e.g. measured per rank.
    latency: time from a send until its payload can be received.
    """
    cost = _cost_function(costs)
    p = len(schedule)
    stages = {a.stage for actions in schedule for a in actions if a.stage is not None}
    num_stages = max(stages) + 1 if stages else p
    clock = [0.0] * p
    position = [0] * p
    busy = [0.0] * p
    timeline = [[] for _ in range(p)]
    done = defaultdict(set)  # (kind, mb, stage) -> {rank}; the set keeps double work visible
    messages = {}  # channel -> (sender rank, time available, consumed?)
    in_flight, peak = [0] * p, [0] * p
    stage_in_flight, stage_peak = defaultdict(int), defaultdict(int)
    stepped = [False] * p

    def fail(rank, action, why):
        raise ScheduleError(f"rank {rank}, action {position[rank]} ({action}): {why}")

    def has(kind, mb, stage):
        return bool(done[(kind, mb, stage)])

    def check_compute(rank, action):
        kind, mb, s = action.kind, action.microbatch, action.stage
        if s is None or mb is None or not 0 <= s < num_stages:
            fail(rank, action, "compute needs a microbatch and a stage")
        if stage_rank(s, p) != rank:
            fail(rank, action, f"stage {s} lives on rank {stage_rank(s, p)}, not here")
        if stepped[rank]:
            fail(rank, action, "computes after OPTIMIZER_STEP")
        backward_done = has(Kind.BACKWARD, mb, s) or has(Kind.BACKWARD_INPUT, mb, s)
        if kind is Kind.FORWARD:
            if has(Kind.FORWARD, mb, s):
                fail(rank, action, "forward runs twice")
            if s > 0 and not (has(Kind.FORWARD, mb, s - 1) if stage_rank(s - 1, p) == rank
                              else ("activation", mb, s - 1) in received[rank]):
                return f"input of stage {s} for micro-batch {mb} (forward of stage {s - 1} or RECV_ACTIVATION)"
        elif kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            if backward_done:
                fail(rank, action, "backward runs twice")
            if not has(Kind.FORWARD, mb, s):
                fail(rank, action, f"backward before the forward of micro-batch {mb} on stage {s}")
            if s < num_stages - 1 and not (
                    (has(Kind.BACKWARD, mb, s + 1) or has(Kind.BACKWARD_INPUT, mb, s + 1))
                    if stage_rank(s + 1, p) == rank else ("grad", mb, s) in received[rank]):
                return f"output gradient of stage {s} for micro-batch {mb} (backward of stage {s + 1} or RECV_GRAD)"
        elif kind is Kind.BACKWARD_WEIGHT:
            if not has(Kind.BACKWARD_INPUT, mb, s):
                fail(rank, action, f"W before B (input gradient) of micro-batch {mb} on stage {s}")
            if has(Kind.BACKWARD_WEIGHT, mb, s):
                fail(rank, action, "W runs twice")
        return None

    def check_send(rank, action):
        direction, mb, boundary = action.channel
        expected_peer = stage_rank(boundary + 1 if direction == "activation" else boundary, p)
        if stage_rank(action.stage, p) != rank or action.peer != expected_peer or expected_peer == rank:
            fail(rank, action, f"stage {action.stage} on rank {stage_rank(action.stage, p)} must send to rank "
                               f"{expected_peer}, not {action.peer}")
        producer = Kind.FORWARD if direction == "activation" else None
        made = has(producer, mb, action.stage) if producer else (
            has(Kind.BACKWARD, mb, action.stage) or has(Kind.BACKWARD_INPUT, mb, action.stage))
        if not made:
            fail(rank, action, f"sends the {direction} of micro-batch {mb} before computing it")
        if action.channel in messages:
            fail(rank, action, f"second send of {direction} for micro-batch {mb} across boundary {boundary}")

    received = [set() for _ in range(p)]
    waiting = {}
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(schedule):
            while position[rank] < len(actions):
                action = actions[position[rank]]
                if action.kind in COMPUTE:
                    missing = check_compute(rank, action)
                    if missing:  # only this rank's earlier actions could have provided it
                        fail(rank, action, f"nothing earlier on this rank provides the {missing}")
                    start = clock[rank]
                    clock[rank] += cost(rank, action)
                    busy[rank] += clock[rank] - start
                    timeline[rank].append((start, clock[rank], action))
                    done[(action.kind, action.microbatch, action.stage)].add(rank)
                    key = action.stage
                    if action.kind is Kind.FORWARD:
                        in_flight[rank] += 1
                        stage_in_flight[key] += 1
                    elif action.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
                        in_flight[rank] -= 1
                        stage_in_flight[key] -= 1
                    peak[rank] = max(peak[rank], in_flight[rank])
                    stage_peak[key] = max(stage_peak[key], stage_in_flight[key])
                elif action.kind in SENDS:
                    check_send(rank, action)
                    messages[action.channel] = [rank, clock[rank] + latency, False]
                elif action.kind in RECEIVES:
                    direction, mb, boundary = action.channel
                    sender = stage_rank(boundary if direction == "activation" else boundary + 1, p)
                    if stage_rank(action.stage, p) != rank or action.peer != sender or sender == rank:
                        fail(rank, action, f"stage {action.stage} must receive from rank {sender}, not {action.peer}")
                    message = messages.get(action.channel)
                    if message is None:
                        waiting[rank] = f"{action} waits for rank {action.peer} to send {direction} of micro-batch {mb}"
                        break
                    if message[2]:
                        fail(rank, action, f"receives {direction} of micro-batch {mb} twice")
                    message[2] = True
                    clock[rank] = max(clock[rank], message[1])
                    received[rank].add(action.channel)
                elif action.kind is Kind.OPTIMIZER_STEP:
                    if stepped[rank]:
                        fail(rank, action, "second OPTIMIZER_STEP")
                    _check_all_weight_gradients(rank, action, p, num_stages, schedule, has, fail)
                    stepped[rank] = True
                    clock[rank] += cost(rank, action)
                else:
                    fail(rank, action, f"unknown action kind {action.kind!r}")
                waiting.pop(rank, None)
                position[rank] += 1
                progress = True

    if waiting:
        stuck = "; ".join(f"rank {r} at action {position[r]}: {why}" for r, why in sorted(waiting.items()))
        raise ScheduleError(f"deadlock: {stuck}")
    unreceived = [f"{d} of micro-batch {mb} across boundary {b} (sent by rank {m[0]})"
                  for (d, mb, b), m in messages.items() if not m[2]]
    if unreceived:
        raise ScheduleError(f"sends without a matching receive: {', '.join(unreceived)}")
    for rank in range(p):
        if not stepped[rank]:
            raise ScheduleError(f"rank {rank}: no OPTIMIZER_STEP")
    _check_complete(p, num_stages, schedule, has)

    makespan = max(clock) if p else 0.0
    return SimulationResult(p, makespan, busy, [makespan - b for b in busy], peak, dict(stage_peak), timeline)


def _microbatches(schedule):
    return {a.microbatch for actions in schedule for a in actions if a.microbatch is not None}


def _check_all_weight_gradients(rank, action, p, num_stages, schedule, has, fail):
    for s in range(rank, num_stages, p):
        for mb in sorted(_microbatches(schedule)):
            if not (has(Kind.BACKWARD, mb, s) or has(Kind.BACKWARD_WEIGHT, mb, s)):
                fail(rank, action, f"OPTIMIZER_STEP before the weight gradient of micro-batch {mb} on stage {s}")


def _check_complete(p, num_stages, schedule, has):
    for mb in sorted(_microbatches(schedule)):
        for s in range(num_stages):
            if not has(Kind.FORWARD, mb, s):
                raise ScheduleError(f"rank {stage_rank(s, p)}: no forward of micro-batch {mb} on stage {s}")
            full, split = has(Kind.BACKWARD, mb, s), has(Kind.BACKWARD_INPUT, mb, s)
            if full == split:
                raise ScheduleError(f"rank {stage_rank(s, p)}: micro-batch {mb} on stage {s} needs exactly one "
                                    f"backward (full, or input+weight), got {'both' if full else 'none'}")


# ---- theory -------------------------------------------------------------------------------------------

def theoretical_bubble(name: str, p: int, m: int, v: int = 1) -> float:
    """The textbook bubble of a schedule as a FRACTION OF TOTAL TIME: idle / (p · makespan), for uniform
    stage costs and free communication — what `SimulationResult.bubble_fraction` and the trace tools
    measure, so every schedule compares with every other and with a run.

    gpipe, 1f1b   (p−1)/(m+p−1).
    interleaved   r/(1+r), r = (1/v)·(p−1)/m, Narayanan et al.'s bubble relative to ideal compute time.
    zb-h1         r/(1+r), r = (p−1)/(3m), Qi et al.'s, relative to ideal compute time, for T_F = T_B = T_W.
    The papers' ratio to ideal compute time is f/(1−f) of the fraction f returned here.
    """
    if name not in SCHEDULES:
        raise ValueError(f"theoretical_bubble: unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    ratio = (p - 1) / (v * m) if name == "interleaved" else (p - 1) / (3 * m)
    return ratio / (1 + ratio)


# ---- teaching -----------------------------------------------------------------------------------------

def format_timeline(result: SimulationResult, width_per_unit: int | None = None) -> str:
    """An ASCII timeline, one line per rank: `F3` forward of micro-batch 3, `B` full backward,
    `I` input gradient (zero-bubble B), `W` weight gradient, `.` idle. With several stages per
    rank the chunk follows the micro-batch (`F3.1`)."""
    intervals = [iv for rank in result.timeline for iv in rank]
    if not intervals:
        return "(empty schedule)"
    num_ranks = result.num_ranks
    chunked = any(a.stage >= num_ranks for _, _, a in intervals)

    def label(action):
        text = f"{action.kind}{action.microbatch}"
        return f"{text}.{action.stage // num_ranks}" if chunked else text

    shortest = min((end - start for start, end, _ in intervals if end > start), default=1.0)
    longest_label = max(len(label(a)) for _, _, a in intervals)
    scale = width_per_unit or math.ceil((longest_label + 1) / shortest)
    lines = [f"makespan {result.makespan:g}, bubble {result.bubble_fraction:.1%}"]
    for rank, intervals_of_rank in enumerate(result.timeline):
        cells = ["."] * math.ceil(result.makespan * scale)
        for start, end, action in intervals_of_rank:
            first, last = round(start * scale), round(end * scale)
            text = label(action).ljust(last - first)[: max(last - first - 1, 1)].ljust(last - first)
            cells[first:last] = list(text)
        lines.append(f"rank {rank}: {''.join(cells).rstrip()}")
    return "\n".join(lines)

"""Where each rank's time went: compute, communication, exposed communication, idle, pipeline bubble.

Pure functions on a loaded `Trace` (tools/trace_io.py), so they can be checked on synthetic traces.

Definitions (all over the traced wall time: first event of any rank to last event of any rank):
  compute         union of the rank's compute-thread spans (forward, backward, optimizer, ...).
  communication   union of the *transfer* part of its comm spans. A comm span is split in two: the
                  first `wait_us` of it is time blocked on a peer (the peer had not sent / arrived
                  yet), the rest is transfer. The runtime reports only the total blocked time, and
                  a blocked wait happens before the data can move, so it is placed at the start.
  exposed comm    communication not overlapped by compute (the compute thread is waiting on it).
  idle            neither computing nor transferring: includes time blocked on a peer. So
                  compute + exposed comm + idle = 100 %.
  overlap         share of the communication time that runs while the rank computes.
  bubble          idle time inside the training steps / the steps' wall time. A step's window runs
                  from the first to the last compute span (of any rank) whose args carry that
                  step; without step args the whole traced time is one window. Waiting on a peer
                  is bubble, moving bytes is not (it is communication), which is what the
                  theoretical bubble (p-1)/(m+p-1) of GPipe and 1F1B assumes: free communication.
  slowest rank    the rank with the most compute time: in a synchronous run the others wait on it.
Percentages are rounded to 3 decimals and milliseconds to 4, so the JSON, the text table and the
HTML viewer show the very same numbers.
"""
from __future__ import annotations

import numpy as np

from ringpipe.tools.trace_io import COMM_THREAD, COMPUTE_THREAD, Trace

DEFINITIONS = {
    "compute": "union of compute-thread spans",
    "communication": "union of comm spans minus their leading wait_us (time blocked on a peer)",
    "exposed_comm": "communication not overlapped by compute",
    "idle": "neither compute nor communication; includes time blocked on a peer",
    "overlap": "communication overlapped by compute / communication",
    "bubble": "idle time within the training steps' windows / their wall time",
    "slowest": "the rank with the most compute time",
}


# ---- interval sets: sorted lists of disjoint [start, end) pairs -------------------------------------
def union(intervals) -> list:
    merged = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1][1] = end
        else:
            merged.append([start, end])
    return merged


def total(intervals) -> int:
    return sum(end - start for start, end in intervals)


def clip(intervals: list, start: int, end: int) -> list:
    """intersect(intervals, [[start, end]]) by bisection: per-step windows stay cheap on long traces."""
    first = _bisect_end(intervals, start)
    last = _bisect_start(intervals, end, first)
    return [[max(s, start), min(e, end)] for s, e in intervals[first:last] if min(e, end) > max(s, start)]


def _bisect_end(intervals: list, t: int) -> int:
    """First index whose interval ends after t (intervals are disjoint and sorted)."""
    lo, hi = 0, len(intervals)
    while lo < hi:
        mid = (lo + hi) // 2
        if intervals[mid][1] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _bisect_start(intervals: list, t: int, lo: int = 0) -> int:
    """First index at or after lo whose interval starts at or after t."""
    hi = len(intervals)
    while lo < hi:
        mid = (lo + hi) // 2
        if intervals[mid][0] < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


def intersect(a: list, b: list) -> list:
    if len(b) == 1:
        return clip(a, b[0][0], b[0][1])
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append([start, end])
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list, b: list) -> list:
    out, j = [], 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append([cursor, b[k][0]])
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append([cursor, end])
    return out


# ---- the pieces of one rank's time ---------------------------------------------------------------
def rank_intervals(trace: Trace, rank: int) -> dict:
    """Interval sets of one rank: compute, comm (transfer), blocked (waiting on a peer)."""
    compute, transfer, blocked = [], [], []
    for span in trace.spans(rank):
        if span.thread == COMM_THREAD:
            wait_ns = min(span.duration_ns, int(round(float(span.args.get("wait_us") or 0) * 1000)))
            blocked.append((span.start_ns, span.start_ns + wait_ns))
            transfer.append((span.start_ns + wait_ns, span.end_ns))
        elif span.thread == COMPUTE_THREAD or span.category == "compute":
            compute.append((span.start_ns, span.end_ns))
    return {"compute": union(compute), "comm": union(transfer), "blocked": union(blocked)}


def breakdown(pieces: dict, window: list) -> dict:
    """Nanoseconds of compute / comm / exposed comm / idle / blocked within `window` (an interval set)."""
    compute = intersect(pieces["compute"], window)
    comm = intersect(pieces["comm"], window)
    busy = union(compute + comm)
    return {
        "wall": total(window),
        "compute": total(compute),
        "comm": total(comm),
        "exposed_comm": total(subtract(comm, compute)),
        "overlapped_comm": total(intersect(comm, compute)),
        "idle": total(subtract(window, busy)),
        "blocked": total(subtract(intersect(pieces["blocked"], window), busy)),
    }


def percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 3) if whole > 0 else 0.0


def step_windows(trace: Trace) -> dict:
    """step -> [start_ns, end_ns] over every rank's compute spans that carry that step."""
    cached = trace.__dict__.get("_step_windows")  # the summary and the viewer both ask
    if cached is not None and cached[0] is trace.events and cached[1] == len(trace.events):
        return {step: list(window) for step, window in cached[2].items()}
    windows: dict = {}
    for span in trace.spans(thread=COMPUTE_THREAD):
        step = span.args.get("step")
        if step is None:
            continue
        window = windows.setdefault(step, [span.start_ns, span.end_ns])
        window[0], window[1] = min(window[0], span.start_ns), max(window[1], span.end_ns)
    windows = dict(sorted(windows.items(), key=lambda item: item[1][0]))
    trace.__dict__["_step_windows"] = (trace.events, len(trace.events), windows)
    return {step: list(window) for step, window in windows.items()}


def schedule_bubble(schedule: dict | None) -> float | None:
    """Idle fraction of total time that the run's schedule predicts (uniform stages, free comm):
    model.parallel.pipeline_parallel.simulator.theoretical_bubble of the trace's schedule record, or
    None without one (or for a schedule it does not know)."""
    if not schedule:
        return None
    from ringpipe.model.parallel.pipeline_parallel.simulator import theoretical_bubble

    name = str(schedule.get("schedule", "")).lower()
    p, m = int(schedule.get("pp", 1)), int(schedule.get("microbatches", 1))
    v = int(schedule.get("virtual_stages", 1) or 1)
    try:
        return float(theoretical_bubble(name, p, m, v))
    except ValueError:
        return None


def operations(trace: Trace) -> list:
    """Per span name and thread, over all ranks: count, total and mean time, bytes (largest total first)."""
    groups: dict = {}
    for span in trace.spans():
        groups.setdefault((span.name, span.thread), []).append(span)
    rows = []
    for (name, thread), spans in groups.items():  # sums per group: one pass of C-level loops each
        args = [s.args for s in spans]
        rows.append({"name": name, "thread": thread, "count": len(spans),
                     "total_ns": sum(s.duration_ns for s in spans),
                     "bytes": sum(int(a["bytes"] or 0) for a in args if "bytes" in a),
                     "blocked_ns": sum(int(float(a["wait_us"] or 0) * 1000) for a in args if "wait_us" in a)})
    rows.sort(key=lambda r: -r["total_ns"])
    return [{"name": r["name"], "thread": r["thread"], "count": r["count"], "total_ms": _ms(r["total_ns"]),
             "mean_us": round(r["total_ns"] / r["count"] / 1000, 3), "bytes": r["bytes"],
             "blocked_ms": _ms(r["blocked_ns"])} for r in rows]


def _ms(ns: float) -> float:
    return round(ns / 1e6, 4)


# ---- the same interval algebra on NumPy arrays, for whole traces (10^5 spans, 10^3 steps) ---------
# A set is an (n, 2) int64 array of sorted, disjoint [start, end) rows. Results equal the list
# functions above (the tests check the summary against hand-worked numbers).
def as_set(pairs) -> np.ndarray:
    """The union of (start, end) pairs as a set; empty pairs are dropped, touching ones merged."""
    a = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    a = a[a[:, 1] > a[:, 0]]
    if not len(a):
        return a
    a = a[np.argsort(a[:, 0], kind="stable")]
    reach = np.maximum.accumulate(a[:, 1])
    first = np.flatnonzero(np.concatenate([[True], a[1:, 0] > reach[:-1]]))
    return np.stack([a[first, 0], np.maximum.reduceat(a[:, 1], first)], axis=1)


def combine(a: np.ndarray, b: np.ndarray, keep) -> np.ndarray:
    """The part of the line where keep(v) holds, v = 1 inside a + 2 inside b (a sweep over the
    boundaries): keep v == 3 is a ∩ b, v == 1 is a \\ b, v > 0 is a ∪ b."""
    t = np.concatenate([a[:, 0], a[:, 1], b[:, 0], b[:, 1]])
    w = np.repeat(np.array([1, -1, 2, -2], dtype=np.int64), [len(a), len(a), len(b), len(b)])
    order = np.argsort(t, kind="stable")
    t, v = t[order], np.cumsum(w[order])
    mask = keep(v[:-1]) & (t[1:] > t[:-1])  # segment i is [t[i], t[i+1]) with value v[i]
    return as_set(np.stack([t[:-1][mask], t[1:][mask]], axis=1))


class Measure:
    """Length of a set's part inside windows, by prefix sums and bisection: O(log n) per window."""

    def __init__(self, intervals: np.ndarray):
        self.starts, self.ends = intervals[:, 0], intervals[:, 1]
        self.before = np.concatenate([[0], np.cumsum(self.ends - self.starts)])

    def up_to(self, t: np.ndarray) -> np.ndarray:
        """Length of the set's part before each time in t."""
        k = np.searchsorted(self.ends, t, side="right")  # intervals 0..k-1 end by t; k ends after
        if not len(self.starts):
            return np.zeros_like(t)
        inside = np.maximum(t - self.starts[np.minimum(k, len(self.starts) - 1)], 0)
        return self.before[k] + np.where(k < len(self.starts), inside, 0)

    def within(self, windows: np.ndarray) -> np.ndarray:
        return self.up_to(windows[:, 1]) - self.up_to(windows[:, 0])


def rank_measures(trace: Trace, rank: int) -> dict:
    """Measures of one rank's compute, comm (transfer), exposed comm, overlapped comm, busy time
    (compute or transfer) and blocked time that is not busy: the sets `breakdown` intersects."""
    compute, comm = [], []
    for span in trace.spans(rank):
        if span.thread == COMM_THREAD:
            comm.append(span)
        elif span.thread == COMPUTE_THREAD or span.category == "compute":
            compute.append((span.start_ns, span.start_ns + span.duration_ns))
    starts = np.array([s.start_ns for s in comm], dtype=np.int64)
    durations = np.array([s.duration_ns for s in comm], dtype=np.int64)
    ends = starts + durations
    wait_us = np.array([float(s.args.get("wait_us") or 0) for s in comm], dtype=np.float64)
    waits = np.minimum(durations, np.rint(wait_us * 1000).astype(np.int64))  # rint rounds as round()
    compute = as_set(compute)
    transfer = as_set(np.stack([starts + waits, ends], axis=1))
    blocked = as_set(np.stack([starts, starts + waits], axis=1))
    busy = combine(compute, transfer, lambda v: v > 0)
    return {"compute": Measure(compute), "comm": Measure(transfer),
            "exposed_comm": Measure(combine(transfer, compute, lambda v: v == 1)),
            "overlapped_comm": Measure(combine(transfer, compute, lambda v: v == 3)),
            "busy": Measure(busy), "blocked": Measure(combine(blocked, busy, lambda v: v == 1))}


def breakdowns(measures: dict, windows: np.ndarray) -> dict:
    """Nanoseconds of compute / comm / exposed comm / idle / blocked in each window (arrays)."""
    out = {name: measures[name].within(windows) for name in ("compute", "comm", "exposed_comm",
                                                            "overlapped_comm", "blocked")}
    out["wall"] = windows[:, 1] - windows[:, 0]
    out["idle"] = out["wall"] - measures["busy"].within(windows)
    return out


def summarize(trace: Trace) -> dict:
    """The summary as plain JSON-able data (see the module docstring for the definitions)."""
    window = np.array([[trace.start_ns, trace.end_ns]] if trace.events else [], dtype=np.int64).reshape(-1, 2)
    windows = step_windows(trace)
    step_array = np.array(list(windows.values()), dtype=np.int64).reshape(-1, 2)
    step_set = as_set(step_array) if windows else window
    ranks, per_step = [], {}
    for rank in trace.ranks:
        measures = rank_measures(trace, rank)
        whole = {k: int(v.sum()) for k, v in breakdowns(measures, window).items()}
        in_steps = {k: int(v.sum()) for k, v in breakdowns(measures, step_set).items()}
        per_step[rank] = breakdowns(measures, step_array)
        ranks.append({
            "rank": rank,
            "wall_ms": _ms(whole["wall"]),
            "compute_ms": _ms(whole["compute"]),
            "comm_ms": _ms(whole["comm"]),
            "exposed_comm_ms": _ms(whole["exposed_comm"]),
            "idle_ms": _ms(whole["idle"]),
            "blocked_ms": _ms(whole["blocked"]),
            "compute_pct": percent(whole["compute"], whole["wall"]),
            "comm_pct": percent(whole["comm"], whole["wall"]),
            "exposed_comm_pct": percent(whole["exposed_comm"], whole["wall"]),
            "idle_pct": percent(whole["idle"], whole["wall"]),
            "overlap_pct": percent(whole["overlapped_comm"], whole["comm"]),
            "bubble_pct": percent(in_steps["idle"], in_steps["wall"]),
            "slowest": False,
        })
    steps = []
    for i, (step, (start, end)) in enumerate(windows.items()):
        rows = []
        for rank in trace.ranks:
            part = {k: int(v[i]) for k, v in per_step[rank].items()}
            rows.append({"rank": rank, "compute_pct": percent(part["compute"], part["wall"]),
                         "exposed_comm_pct": percent(part["exposed_comm"], part["wall"]),
                         "idle_pct": percent(part["idle"], part["wall"])})
        steps.append({"step": step, "start_ms": _ms(start), "wall_ms": _ms(end - start), "ranks": rows})
    slowest = None
    if ranks:
        slowest = max(ranks, key=lambda r: (r["compute_ms"], r["compute_ms"] + r["exposed_comm_ms"], -r["rank"]))
        slowest["slowest"] = True
        slowest = slowest["rank"]
    theory = schedule_bubble(trace.schedule)
    measured = round(sum(r["bubble_pct"] for r in ranks) / len(ranks), 3) if ranks else 0.0
    return {
        "directory": trace.directory,
        "world_size": len(trace.ranks),
        "missing_ranks": list(trace.missing_ranks),
        "wall_ms": _ms(total(window)),
        "clock": trace.clock_source,
        "ranks": ranks,
        "slowest_rank": slowest,
        "bubble": {"measured_pct": measured,
                   "theoretical_pct": None if theory is None else round(100.0 * theory, 3),
                   "window": "steps" if windows else "trace",
                   "schedule": trace.schedule},
        "steps": steps,
        "operations": operations(trace),
        "causality": {"pairs_checked": trace.causality.pairs_checked,
                      "violations": trace.causality.violations, "worst": trace.causality.worst},
        "definitions": DEFINITIONS,
    }


def format_summary(summary: dict, max_steps: int | None = 8) -> str:
    """A plain-text table, one row per rank, then bubble, per-step and causality lines.

    At most `max_steps` per-step lines (the slowest ones, in step order); None prints them all."""
    header = (f"{'rank':>4} {'wall ms':>10} {'compute%':>9} {'comm%':>7} {'exposed%':>9} {'idle%':>7} "
              f"{'overlap%':>9} {'bubble%':>8}")
    lines = [f"trace {summary['directory']}  ({summary['world_size']} ranks, {summary['wall_ms']:.3f} ms, "
             f"clock: {summary['clock']})", header]
    missing = summary.get("missing_ranks")
    if missing:
        lines.insert(1, f"warning: no trace file for rank{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing))} (trace-rankN.json): this summarises "
                        f"{summary['world_size']} of {summary['world_size'] + len(missing)} ranks")
    for r in summary["ranks"]:
        flag = "  <- slowest" if r["slowest"] else ""
        lines.append(f"{r['rank']:>4} {r['wall_ms']:>10.3f} {r['compute_pct']:>9.2f} {r['comm_pct']:>7.2f} "
                     f"{r['exposed_comm_pct']:>9.2f} {r['idle_pct']:>7.2f} {r['overlap_pct']:>9.2f} "
                     f"{r['bubble_pct']:>8.2f}{flag}")
    bubble = summary["bubble"]
    theory = "n/a (no schedule.json)" if bubble["theoretical_pct"] is None else f"{bubble['theoretical_pct']:.2f}%"
    lines.append(f"bubble (mean over ranks, {bubble['window']} window): measured {bubble['measured_pct']:.2f}%, "
                 f"theoretical {theory}")
    steps = summary["steps"]
    if max_steps is not None and len(steps) > max_steps:
        slowest = sorted(steps, key=lambda st: -st["wall_ms"])[:max_steps]
        lines.append(f"{max_steps} slowest of {len(steps)} steps (`ringpipe trace summary --all-steps` for all):")
        steps = sorted(slowest, key=lambda st: st["step"])
    for step in steps:
        cells = "  ".join(f"r{r['rank']} {r['compute_pct']:.1f}/{r['exposed_comm_pct']:.1f}/{r['idle_pct']:.1f}"
                          for r in step["ranks"])
        lines.append(f"step {step['step']}: {step['wall_ms']:.3f} ms  compute/exposed/idle %  {cells}")
    lines.append("operations (all ranks): name, thread, count, total ms, mean us, blocked ms, bytes")
    for op in summary["operations"][:12]:
        lines.append(f"  {op['name']:<16} {op['thread']:<8} {op['count']:>7} {op['total_ms']:>10.3f} "
                     f"{op['mean_us']:>10.1f} {op['blocked_ms']:>10.3f} {op['bytes']:>12}")
    causality = summary["causality"]
    lines.append(f"causality: {causality['violations']} of {causality['pairs_checked']} send/recv pairs violated")
    for v in causality["worst"]:
        lines.append(f"  recv on rank {v['recv_rank']} ended {v['by_us']:.1f} us before the send on rank "
                     f"{v['send_rank']} started (flow {v['flow']})")
    lines.append("definitions: idle includes time blocked on a peer; bubble = idle within the steps")
    return "\n".join(lines)

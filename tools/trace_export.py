"""Chrome Trace Event JSON (Perfetto, chrome://tracing) from a loaded trace.

Layout: one process per rank (pid = rank, named "rank N", sorted by rank); threads "compute" and
"comm", plus "compute 2", "comm 2", ... lanes when spans on one thread overlap without nesting
(several comm operations are in flight at once on the engine thread), so every lane nests properly.
Times are microseconds from the common base of tools/trace_io.py.

Arrows are legacy flow events, the form the PyTorch profiler writes and both Perfetto and
chrome://tracing draw: a "s" event inside the source span and a "f" event with "bp": "e" (bind to
the enclosing slice) inside the destination span, sharing cat, name and id. Each send is linked to
its matching recv; the ranks of one collective are chained in rank order.
"""
from __future__ import annotations

import json

from ringpipe.runtime.files import write_text
from ringpipe.tools.trace_io import COMM_THREAD, COMPUTE_THREAD, POINT_TO_POINT, Trace, peer_rank

THREAD_ORDER = (COMPUTE_THREAD, COMM_THREAD)


def microseconds(ns: int) -> float:
    return round(ns / 1000.0, 3)


def assign_lanes(spans: list) -> list:
    """Split spans of one thread into lanes in which spans nest; returns a lane index per span.

    Greedy: each span goes on the first lane where, after closing the spans that ended, it fits
    inside the innermost open span (or the lane has none open).
    """
    keys = [(s.start_ns, -s.duration_ns) for s in spans]
    order = sorted(range(len(spans)), key=keys.__getitem__)
    stacks: list = []  # per lane: end times of the open spans, innermost last
    lanes = [0] * len(spans)
    for i in order:
        start, end = spans[i].start_ns, spans[i].end_ns
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                lanes[i] = lane
                break
        else:
            stacks.append([end])
            lanes[i] = len(stacks) - 1
    return lanes


def lane_name(thread: str, lane: int) -> str:
    return thread if lane == 0 else f"{thread} {lane + 1}"


def _thread_rank(name: str) -> tuple:
    base, _, number = name.partition(" ")
    kind = THREAD_ORDER.index(base) if base in THREAD_ORDER else len(THREAD_ORDER)
    return kind, base, int(number) if number.isdigit() else 1


def _jsonable(args: dict) -> dict:
    """The args with a point-to-point peer's global rank added; values JSON cannot hold are
    written as strings (`write_chrome_trace` passes default=str), so args pass through as they are."""
    if "peer" in args:
        return {**args, "peer_rank": peer_rank(args)}
    return args


def to_chrome_trace(trace: Trace) -> dict:
    """The {"traceEvents": [...], ...} object for one trace."""
    out, lane_of, tids_of = [], {}, {}
    other_threads: dict = {}  # rank -> threads of its counters and instants
    for e in trace.events:
        if e.phase != "X":
            other_threads.setdefault(e.rank, set()).add(e.thread)
    for rank in trace.ranks:
        spans_by_thread: dict = {}
        for span in trace.spans(rank):
            spans_by_thread.setdefault(span.thread, []).append(span)
        names = set()
        for thread, spans in spans_by_thread.items():
            for span, lane in zip(spans, assign_lanes(spans)):
                lane_of[id(span)] = name = lane_name(thread, lane)
                names.add(name)
        names |= other_threads.get(rank, set())
        names = sorted(names | {COMPUTE_THREAD, COMM_THREAD}, key=_thread_rank)
        tids = {name: index + 1 for index, name in enumerate(names)}
        tids_of[rank] = tids
        out.append({"ph": "M", "pid": rank, "tid": 0, "name": "process_name", "args": {"name": f"rank {rank}"}})
        out.append({"ph": "M", "pid": rank, "tid": 0, "name": "process_sort_index", "args": {"sort_index": rank}})
        if trace.pids.get(rank) is not None:
            out.append({"ph": "M", "pid": rank, "tid": 0, "name": "process_labels",
                        "args": {"labels": f"os pid {trace.pids[rank]}"}})
        for name, tid in tids.items():
            out.append({"ph": "M", "pid": rank, "tid": tid, "name": "thread_name", "args": {"name": name}})
            out.append({"ph": "M", "pid": rank, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})

    flows: dict = {}
    for event in trace.events:
        tids = tids_of[event.rank]
        # = microseconds(): for integer ns, x / 1000 is already the nearest double to 3 decimals
        ts = event.start_ns / 1000 if type(event.start_ns) is int else microseconds(event.start_ns)
        if event.phase == "X":
            tid = tids[lane_of[id(event)]]
            out.append({"ph": "X", "pid": event.rank, "tid": tid, "ts": ts,
                        "dur": round(microseconds(event.end_ns) - ts, 3), "name": event.name,
                        "cat": event.category, "args": _jsonable(event.args)})
            if "flow" in event.args:
                flows.setdefault(str(event.args["flow"]), []).append((event, tid, ts))
        elif event.phase == "C":
            out.append({"ph": "C", "pid": event.rank, "tid": tids.get(event.thread, 1), "ts": ts,
                        "name": event.name, "cat": event.category, "args": _jsonable(event.args)})
        elif event.phase == "i":
            out.append({"ph": "i", "s": "t", "pid": event.rank, "tid": tids.get(event.thread, 1), "ts": ts,
                        "name": event.name, "cat": event.category, "args": _jsonable(event.args)})
    out.extend(flow_events(flows))
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"source": "ringpipe", "directory": trace.directory, "clock": trace.clock_source,
                          "causality_violations": trace.causality.violations}}


def flow_events(flows: dict) -> list:
    """Arrow pairs: send -> recv, and rank k -> rank k+1 within each collective."""
    out, next_id = [], 1
    for key, members in sorted(flows.items()):
        if members[0][0].name in POINT_TO_POINT:
            sends = [m for m in members if m[0].name == "send"]
            recvs = [m for m in members if m[0].name == "recv"]
            pairs = [(sends[0], recvs[0])] if sends and recvs else []
            category = "p2p"
        else:
            chain = sorted(members, key=lambda m: m[0].rank)
            pairs = list(zip(chain, chain[1:]))
            category = "collective"
        for (source, source_tid, source_ts), (target, target_tid, target_ts) in pairs:
            common = {"cat": category, "name": f"{source.name} {key}", "id": next_id}
            out.append({"ph": "s", "pid": source.rank, "tid": source_tid, "ts": source_ts, **common})
            out.append({"ph": "f", "bp": "e", "pid": target.rank, "tid": target_tid, "ts": target_ts, **common})
            next_id += 1
    return out


def write_chrome_trace(trace: Trace, path: str) -> int:
    """Write the JSON; returns the number of trace events."""
    data = to_chrome_trace(trace)
    # json.dumps, not json.dump: only the one-shot encoder runs in C (3-5x faster on 10^5 events).
    write_text(path, json.dumps(data, separators=(",", ":"), default=str))
    return len(data["traceEvents"])

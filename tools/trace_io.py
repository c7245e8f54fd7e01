"""Load a trace directory: per-rank events on one clock, plus the run's metrics and schedule.

A trace directory (usually the run directory) holds what `Cluster.stop_trace` wrote:
  trace-rank{r}.json  {"rank", "pid", "clock": "monotonic_ns", "events": [[phase, name, category,
                      thread, start_ns, duration_ns, args], ...]}
  clocks.json         {"world_size", "offsets": {"start"|"end": {rank: {"offset_ns", "rtt_ns"}}}}
and, when it is a training run, metrics.jsonl (one JSON object per step) and schedule.json.

Step numbers: a span's "step" arg in the rank files is the 0-based step index the trainer ran;
loading turns it into the 1-based step number that the progress line and metrics.jsonl show, so
every tool (summary, viewer, export) names a step the way the console does.

Clock correction: offset = rank clock - driver clock, measured at the start and at the end of
tracing. Hosts drift, so the offset at a rank time t is interpolated linearly between the two
samples. The samples carry no timestamp of their own, and they bracket the trace (measured just
before the first and just after the last event), so the start sample is placed at the rank's first
event and the end sample at its last event. A sample that does carry "rank_ns" (the rank time when
it was taken) is placed there instead. After correction every time is shifted so the earliest
event of the whole trace is 0: all returned times are integer nanoseconds from that common base.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import itertools
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ringpipe.model.training.run_dir import CLOCKS_FILE, METRICS_FILE, SCHEDULE_FILE, TRACE_RANK_GLOB

COMM_THREAD = "comm"
COMPUTE_THREAD = "compute"
# Operations whose spans pair a sender with a receiver (the same `flow` id on both sides).
POINT_TO_POINT = ("send", "recv")


class TraceError(Exception):
    """The directory is not a readable trace (missing, empty, or corrupt); the message says which file."""


class TraceNotFound(TraceError):
    """No trace where the command line says: the directory does not exist or holds no rank's trace."""


@dataclass(slots=True)
class Event:
    """One event on the common time base. phase "X" span, "C" counter, "i" instant."""
    phase: str
    rank: int
    name: str
    category: str
    thread: str
    start_ns: int
    duration_ns: int
    args: dict

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns


@dataclass
class CausalityReport:
    """Matched send/recv pairs where the receive ended before the send started (impossible)."""
    pairs_checked: int = 0
    violations: int = 0
    worst: list = field(default_factory=list)  # dicts, largest violation first


@dataclass
class Trace:
    directory: str
    ranks: list                      # sorted rank numbers that wrote a file
    events: list                     # Event, sorted by start time
    pids: dict                       # rank -> OS process id
    clock_source: str                # "clocks.json (interpolated)" or "none (raw rank clocks)"
    offsets_ns: dict                 # rank -> (offset at first event, offset at last event)
    base_ns: int                     # driver time of the common zero
    metrics: list = field(default_factory=list)
    schedule: dict | None = None
    causality: CausalityReport = field(default_factory=CausalityReport)
    missing_ranks: list = field(default_factory=list)  # ranks of the run (clocks.json's world_size) with no file

    def spans(self, rank: int | None = None, thread: str | None = None) -> list:
        """The "X" events, in start order, of one rank and/or thread (None: all)."""
        cached = self.__dict__.get("_spans")  # the tools ask many times; a trace has 10^5+ events
        if cached is None or cached[0] is not self.events or cached[1] != len(self.events):
            cached = self.__dict__["_spans"] = (self.events, len(self.events),
                                                [e for e in self.events if e.phase == "X"])
        spans = cached[2]
        if rank is not None and thread is not None:
            return [e for e in spans if e.rank == rank and e.thread == thread]
        if rank is not None:
            return [e for e in spans if e.rank == rank]
        if thread is not None:
            return [e for e in spans if e.thread == thread]
        return list(spans)

    @property
    def start_ns(self) -> int:
        return min((e.start_ns for e in self.events), default=0)

    @property
    def end_ns(self) -> int:
        return max((e.end_ns for e in self.events), default=0)


@contextlib.contextmanager
def bulk_allocation():
    """Pause the cyclic garbage collector while 10^5+ small objects are built. Trace objects hold
    no cycles (reference counting frees them), but the collector's full passes rescan every live
    one: the 4th rank file of the README's 500-step trace parsed 2.7x slower than the 1st."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: corrupt JSON ({exc.msg.removesuffix(' at')} at line {exc.lineno})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror})") from None


def rank_files(directory: str) -> dict:
    """rank -> path of trace-rank{r}.json in `directory` (raises TraceError if there are none)."""
    if not os.path.isdir(directory):
        raise TraceNotFound(f"{directory}: no such directory")
    files = {}
    for path in glob.glob(os.path.join(directory, TRACE_RANK_GLOB)):
        match = re.fullmatch(r"trace-rank(\d+)\.json", os.path.basename(path))
        if match:
            files[int(match.group(1))] = path
    if not files:
        raise TraceNotFound(f"{directory}: no trace-rank*.json files; record a run's trace with "
                         f"`ringpipe train --trace --out {directory} ...` (or cluster.start_trace()/stop_trace(DIR))")
    return dict(sorted(files.items()))


def _offset_samples(clocks: dict | None, rank: int):
    """(start sample, end sample) dicts for `rank`, or Nones."""
    if not clocks:
        return None, None
    offsets = clocks.get("offsets", {})
    return (offsets.get("start", {}).get(str(rank)) or offsets.get("start", {}).get(rank),
            offsets.get("end", {}).get(str(rank)) or offsets.get("end", {}).get(rank))


def clock_correction(first_ns: int, last_ns: int, start_sample: dict | None, end_sample: dict | None):
    """A function rank time -> driver time, interpolating the offset linearly between the samples."""
    offset, slope, t0 = _correction(first_ns, last_ns, start_sample, end_sample)
    if slope == 0.0:
        return lambda t: t - offset
    return lambda t: t - int(round(offset + slope * (t - t0)))


def _correction(first_ns: int, last_ns: int, start_sample: dict | None, end_sample: dict | None):
    """(offset at t0, slope, t0) of the linear offset: driver time = t - round(offset + slope * (t - t0))."""
    samples = [s for s in (start_sample, end_sample) if s and s.get("offset_ns") is not None]
    if not samples:
        return 0, 0.0, 0
    if len(samples) == 1:
        return samples[0]["offset_ns"], 0.0, 0
    t0 = start_sample.get("rank_ns", first_ns)
    t1 = end_sample.get("rank_ns", last_ns)
    o0, o1 = start_sample["offset_ns"], end_sample["offset_ns"]
    if t1 <= t0:
        return (o0 + o1) // 2, 0.0, 0
    return o0, (o1 - o0) / (t1 - t0), t0


def check_causality(events: list, worst: int = 5) -> CausalityReport:
    """Each recv must end no earlier than its matching send (same `flow` id) starts."""
    sends, recvs = {}, {}
    for e in events:
        if e.phase == "X" and e.name in POINT_TO_POINT and "flow" in e.args:
            (sends if e.name == "send" else recvs)[e.args["flow"]] = e
    report = CausalityReport()
    bad = []
    for flow, recv in recvs.items():
        send = sends.get(flow)
        if send is None:
            continue
        report.pairs_checked += 1
        if recv.end_ns < send.start_ns:
            bad.append({"flow": flow, "send_rank": send.rank, "recv_rank": recv.rank,
                        "by_us": (send.start_ns - recv.end_ns) / 1000.0})
    bad.sort(key=lambda v: -v["by_us"])
    report.violations, report.worst = len(bad), bad[:worst]
    return report


def peer_rank(args: dict):
    """The global rank of a point-to-point span's peer. The runtime records "peer" as the index
    within the span's group, and the group id ("w/1,3#0": global ranks 1 and 3 of the world "w",
    first such group) lists the group's global ranks after its last "/"."""
    peer, group = args.get("peer"), args.get("group")
    if isinstance(group, str) and "/" in group and isinstance(peer, int):
        members = group.rsplit("/", 1)[1].split("#", 1)[0].split(",")
        if 0 <= peer < len(members) and members[peer].isdigit():
            return int(members[peer])
    return peer


def read_metrics(directory: str) -> list:
    """metrics.jsonl rows (dicts); a torn last line (run still writing) is skipped. "step" is the
    1-based step number; files from before that numbering (a row with step 0) are renumbered."""
    path = os.path.join(directory, METRICS_FILE)
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    if any(row.get("step") == 0 for row in rows):  # written before steps were numbered from 1
        rows = [{**row, "step": row["step"] + 1} if isinstance(row.get("step"), int) else row for row in rows]
    return rows


def load_trace(directory: str, counters: bool = True) -> Trace:
    """Read every rank's events onto the driver clock, with a common zero at the earliest event.
    `counters=False` keeps only spans and instants (what the summary and the viewer use)."""
    with bulk_allocation():
        return _load_trace(directory, counters)


def _load_trace(directory: str, counters: bool) -> Trace:
    files = rank_files(directory)
    clocks_path = os.path.join(directory, CLOCKS_FILE)
    clocks = _read_json(clocks_path) if os.path.exists(clocks_path) else None
    per_rank, pids, offsets, firsts = [], {}, {}, {}
    malformed = "malformed event (expected [phase, name, category, thread, start_ns, duration_ns, args])"
    for rank, path in files.items():
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise TraceError(f"{path}: not a rank trace (expected an object with an 'events' list)")
        pids[rank] = data.get("pid")
        events = data["events"]
        # Column-wise with NumPy: Python-level work here runs once per event (10^5 and more).
        try:
            if set(map(len, events)) - {7}:
                raise ValueError
            every_start = np.array([e[4] for e in events], dtype=np.int64)
            every_end = every_start + np.array([e[5] for e in events], dtype=np.int64)
            rows = events if counters else [e for e in events if e[0] != "C"]
            columns = list(zip(*rows)) or [()] * 7
            start = np.array(columns[4], dtype=np.int64)
            end = start + np.array(columns[5], dtype=np.int64)
            args = [a if type(a) is dict else dict(a or {}) for a in columns[6]]
        except (TypeError, ValueError, OverflowError):
            raise TraceError(f"{path}: {malformed}") from None
        first = int(every_start.min()) if len(events) else 0
        last = int(every_end.max()) if len(events) else 0
        offset, slope, t0 = _correction(first, last, *_offset_samples(clocks, rank))
        offsets[rank] = (int(round(offset + slope * (first - t0))), int(round(offset + slope * (last - t0))))
        if events:
            firsts[rank] = first
        if slope:  # np.rint rounds half to even, as round() does
            start = start - np.rint(offset + slope * (start - t0)).astype(np.int64)
            end = end - np.rint(offset + slope * (end - t0)).astype(np.int64)
        else:
            start, end = start - offset, end - offset
        for a in args:
            if type(a.get("step")) is int:
                a["step"] += 1  # step index -> step number (see the module docstring)
        per_rank.append((rank, columns, start, np.maximum(end - start, 0), args))
    # The common zero: the earliest corrected event (counters included, so every tool agrees).
    base = min((first - offsets[rank][0] for rank, first in firsts.items()), default=0)
    raw = []
    for rank, columns, start, duration, args in per_rank:
        raw.extend(map(Event, columns[0], itertools.repeat(rank), columns[1], columns[2], columns[3],
                       (start - base).tolist(), duration.tolist(), args))
    raw.sort(key=lambda e: (e.start_ns, -e.duration_ns))
    schedule_path = os.path.join(directory, SCHEDULE_FILE)
    schedule = _read_json(schedule_path) if os.path.exists(schedule_path) else None
    if not isinstance(schedule, dict):
        schedule = None
    return Trace(directory=os.path.abspath(directory), ranks=list(files), events=raw, pids=pids,
                 clock_source="clocks.json (interpolated)" if clocks else "none (raw rank clocks)",
                 offsets_ns=offsets, base_ns=base, metrics=read_metrics(directory), schedule=schedule,
                 causality=check_causality(raw), missing_ranks=_missing_ranks(clocks, files))


def _missing_ranks(clocks, files: dict) -> list:
    """The ranks of the run without a trace file: below clocks.json's world size (without it, below
    the highest rank that has one)."""
    world = clocks.get("world_size") if isinstance(clocks, dict) else None
    world = world if isinstance(world, int) and world > 0 else max(files, default=-1) + 1
    return sorted(set(range(world)) - set(files))

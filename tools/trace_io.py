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

import glob
import json
import os
import re
from dataclasses import dataclass, field

COMM_THREAD = "comm"
COMPUTE_THREAD = "compute"
# Operations whose spans pair a sender with a receiver (the same `flow` id on both sides).
POINT_TO_POINT = ("send", "recv")


class TraceError(Exception):
    """The directory is not a readable trace (missing, empty, or corrupt); the message says which file."""


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

    def spans(self, rank: int | None = None, thread: str | None = None) -> list:
        return [e for e in self.events if e.phase == "X" and (rank is None or e.rank == rank)
                and (thread is None or e.thread == thread)]

    @property
    def start_ns(self) -> int:
        return min((e.start_ns for e in self.events), default=0)

    @property
    def end_ns(self) -> int:
        return max((e.end_ns for e in self.events), default=0)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror})") from None


def rank_files(directory: str) -> dict:
    """rank -> path of trace-rank{r}.json in `directory` (raises TraceError if there are none)."""
    if not os.path.isdir(directory):
        raise TraceError(f"{directory}: no such directory")
    files = {}
    for path in glob.glob(os.path.join(directory, "trace-rank*.json")):
        match = re.fullmatch(r"trace-rank(\d+)\.json", os.path.basename(path))
        if match:
            files[int(match.group(1))] = path
    if not files:
        raise TraceError(f"{directory}: no trace-rank*.json files (record with cluster.start_trace/stop_trace)")
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
    samples = [s for s in (start_sample, end_sample) if s and s.get("offset_ns") is not None]
    if not samples:
        return lambda t: t
    if len(samples) == 1:
        offset = samples[0]["offset_ns"]
        return lambda t: t - offset
    t0 = start_sample.get("rank_ns", first_ns)
    t1 = end_sample.get("rank_ns", last_ns)
    o0, o1 = start_sample["offset_ns"], end_sample["offset_ns"]
    if t1 <= t0:
        return lambda t: t - (o0 + o1) // 2
    slope = (o1 - o0) / (t1 - t0)
    return lambda t: t - int(round(o0 + slope * (t - t0)))


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


def read_metrics(directory: str) -> list:
    """metrics.jsonl rows (dicts); a torn last line (run still writing) is skipped. "step" is the
    1-based step number; files from before that numbering (a row with step 0) are renumbered."""
    path = os.path.join(directory, "metrics.jsonl")
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


def load_trace(directory: str) -> Trace:
    """Read every rank's events onto the driver clock, with a common zero at the earliest event."""
    files = rank_files(directory)
    clocks_path = os.path.join(directory, "clocks.json")
    clocks = _read_json(clocks_path) if os.path.exists(clocks_path) else None
    raw, pids, offsets = [], {}, {}
    for rank, path in files.items():
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            raise TraceError(f"{path}: not a rank trace (expected an object with an 'events' list)")
        pids[rank] = data.get("pid")
        events = data["events"]
        try:
            first = min((int(e[4]) for e in events), default=0)
            last = max((int(e[4]) + int(e[5]) for e in events), default=0)
        except (TypeError, ValueError, IndexError):
            raise TraceError(f"{path}: malformed event (expected [phase, name, category, thread, "
                             f"start_ns, duration_ns, args])") from None
        start_sample, end_sample = _offset_samples(clocks, rank)
        to_driver = clock_correction(first, last, start_sample, end_sample)
        offsets[rank] = (first - to_driver(first), last - to_driver(last))
        try:
            for phase, name, category, thread, start, duration, args in events:
                begin = to_driver(int(start))
                end = to_driver(int(start) + int(duration))
                args = dict(args or {})
                if type(args.get("step")) is int:
                    args["step"] += 1  # step index -> step number (see the module docstring)
                raw.append(Event(phase, rank, name, category, thread, begin, max(0, end - begin), args))
        except (TypeError, ValueError):
            raise TraceError(f"{path}: malformed event (expected [phase, name, category, thread, "
                             f"start_ns, duration_ns, args])") from None
    base = min((e.start_ns for e in raw), default=0)
    for e in raw:
        e.start_ns -= base
    raw.sort(key=lambda e: (e.start_ns, -e.duration_ns))
    schedule_path = os.path.join(directory, "schedule.json")
    schedule = _read_json(schedule_path) if os.path.exists(schedule_path) else None
    if not isinstance(schedule, dict):
        schedule = None
    return Trace(directory=os.path.abspath(directory), ranks=list(files), events=raw, pids=pids,
                 clock_source="clocks.json (interpolated)" if clocks else "none (raw rank clocks)",
                 offsets_ns=offsets, base_ns=base, metrics=read_metrics(directory), schedule=schedule,
                 causality=check_causality(raw))

"""Per-rank trace recording: spans (compute and communication), counters, and flow keys.

One `Tracer` per worker process. Off by default, and then every hook is a single attribute test.
When on, events are appended to an in-memory list (cheap: a tuple per event) and written to
`DIR/trace-rank{rank}.json` when tracing stops. Timestamps are this host's monotonic clock in
nanoseconds; the driver measures each rank's offset to its own clock (see Cluster.stop_trace) so
traces from several hosts merge onto one time base.

Event tuple: (phase, name, category, thread, start_ns, duration_ns, args)
  phase "X" = complete span, "C" = counter sample (args = {series: value}), "i" = instant.
  thread "compute" or "comm". Communication spans carry in args: bytes, peer / group, tag or seq,
  wait_us (time blocked on a peer), and `flow` (an id shared by the matching send and recv, or by
  every rank's part of one collective) so exporters can draw arrows.
"""
from __future__ import annotations

import os
import time

from ringpipe.runtime.files import make_directory, write_json

now_ns = time.monotonic_ns


class Tracer:
    def __init__(self, rank: int):
        self.rank = rank
        self.enabled = False
        self.events: list = []
        self.flow_counts: dict = {}

    def start(self):
        self.events = []
        self.flow_counts = {}
        self.enabled = True

    def complete(self, name: str, category: str, thread: str, start_ns: int, end_ns: int, args: dict | None = None):
        if self.enabled:
            self.events.append(("X", name, category, thread, start_ns, end_ns - start_ns, args or {}))

    def counter(self, name: str, value: float, thread: str = "compute"):
        if self.enabled:
            self.events.append(("C", name, "counter", thread, now_ns(), 0, {name: value}))

    def instant(self, name: str, thread: str = "compute", args: dict | None = None):
        if self.enabled:
            self.events.append(("i", name, "mark", thread, now_ns(), 0, args or {}))

    def span(self, name: str, category: str = "compute", **args):
        """Record the enclosed `with` block as a span on the compute thread (a no-op when off)."""
        if not self.enabled:
            return _NO_SPAN
        return _Span(self.events, name, category, args)

    def next_flow(self, key: tuple) -> str:
        """The n-th message on a (group, src, dst, tag, call) channel gets the same id on both sides."""
        n = self.flow_counts.get(key, 0)
        self.flow_counts[key] = n + 1
        return ":".join(map(str, key)) + f":{n}"

    def stop(self, directory: str) -> str:
        """Stop recording and write this rank's events; returns the file path."""
        self.enabled = False
        make_directory(directory)
        path = os.path.join(directory, f"trace-rank{self.rank}.json")
        write_json(path, {"rank": self.rank, "pid": os.getpid(), "clock": "monotonic_ns",
                          "events": self.events}, separators=(",", ":"))
        self.events = []
        return path


class _Span:
    __slots__ = ("events", "name", "category", "args", "start")

    def __init__(self, events, name, category, args):
        self.events, self.name, self.category, self.args = events, name, category, args

    def __enter__(self):
        self.start = now_ns()
        return self

    def __exit__(self, *exc):
        self.events.append(("X", self.name, self.category, "compute", self.start, now_ns() - self.start, self.args))
        return False


class _NoSpan:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_SPAN = _NoSpan()

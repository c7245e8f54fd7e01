"""The cluster's trace controls: every worker records spans between `start_trace()` and
`stop_trace(dir)`, and the driver measures each worker's clock offset at both ends so that the
ranks' timelines can be laid on one axis (see tools/trace_io.py).
"""
from __future__ import annotations

import os
import threading
import time

from ringpipe.runtime.calls import ClusterStopped
from ringpipe.runtime.files import write_json


class TraceControl:
    """Mixed into `Cluster`: uses its driver thread (`_post`, `_send_to`, `_receive_all`, `_router`),
    `_call` and `world_size`."""

    # ---- tracing ---------------------------------------------------------------------------------------
    def start_trace(self):
        """Every worker starts recording spans; clock offsets to the driver are measured now."""
        self._trace_clocks = {"start": self.measure_clock_offsets()}
        for rank in range(self.world_size):
            self._post(rank, {"t": "trace"})

    def stop_trace(self, directory: str) -> list[str]:
        """Stop recording; each rank writes DIR/trace-rank{r}.json, the driver DIR/clocks.json."""
        paths = self._call("trace_stop", None, [os.path.abspath(directory)], {}, None, name="stop_trace").result()
        clocks = getattr(self, "_trace_clocks", {})
        clocks["end"] = self.measure_clock_offsets()
        write_json(os.path.join(directory, "clocks.json"), {"world_size": self.world_size, "offsets": clocks},
                   indent=1)
        return paths

    def measure_clock_offsets(self, samples: int = 15) -> dict[int, dict]:
        """Each rank's clock minus the driver's (ns), from the ping-pong with the lowest round trip."""
        done = threading.Event()
        result: dict[int, dict] = {}

        def ping_all():  # runs on the driver thread, which owns the socket
            for rank in range(self.world_size):
                best = None
                for _ in range(samples):
                    self._clock_replies.pop(rank, None)
                    sent = time.monotonic_ns()
                    self._send_to(rank, {"t": "clock"})
                    deadline = time.monotonic() + 2.0
                    while rank not in self._clock_replies and time.monotonic() < deadline:
                        if self._router.poll(10):
                            self._receive_all()
                    received = time.monotonic_ns()
                    if rank not in self._clock_replies:
                        break
                    rtt = received - sent
                    offset = self._clock_replies[rank] - (sent + received) // 2
                    if best is None or rtt < best["rtt_ns"]:
                        best = {"offset_ns": offset, "rtt_ns": rtt, "rank_ns": self._clock_replies[rank]}
                result[rank] = best or {"offset_ns": 0, "rtt_ns": None}
            done.set()

        if self._failure is not None:
            raise ClusterStopped(self._failure)
        self._post(0, ping_all)
        deadline = time.monotonic() + 60
        while not done.wait(0.05):
            if not self._thread.is_alive():  # stopped by a lost worker before it got to the pings
                raise ClusterStopped(self._failure or RuntimeError("the cluster was closed"))
            if time.monotonic() > deadline:
                raise TimeoutError("clock offsets: the driver thread did not answer")
        return result


__all__ = ["TraceControl"]

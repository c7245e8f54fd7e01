"""The handle of a receive over a same-host pair ring (runtime/shm_p2p.py): `wait()` reads the ring
in the calling thread, checks the message against `out`, and records the receive's trace span as
the engine's receives are recorded (blocked until the message arrived, then the copy)."""
from __future__ import annotations

import time

import numpy as np

from ringpipe.runtime.operations import Cancelled
from ringpipe.runtime.trace import now_ns


class RingReceive:
    """The handle of a receive over a ring: `wait()` reads the ring in the calling thread."""

    def __init__(self, rings, src: int, key: tuple, name: str, timeout: float, out, expect, finish,
                 trace):
        self.rings, self.src, self.key, self.name, self.timeout = rings, src, key, name, timeout
        self.ticket = rings.post(src, key)
        self.call = rings.engine.call
        self.deadline = time.monotonic() + timeout
        self.out, self.expect, self.finish, self.trace = out, expect, finish, trace
        self.start = now_ns()
        self._done, self._result, self._error = False, None, None

    def is_done(self) -> bool:
        if not self._done and self.call == self.rings.engine.call:
            found = self.rings.take(self.src, self.key, self.ticket, self.deadline, self.name, self.timeout,
                                    block=False, out=self.out)
            if found is not None:
                self._complete(*found)
        return self._done

    def wait(self, timeout: float | None = None):
        if not self._done:
            engine = self.rings.engine
            if self.call != engine.call:
                self._fail(Cancelled(f"{self.name} was cancelled on rank {engine.rank}: its call ended before it "
                                     f"finished; wait() for asynchronous operations before a call returns"))
            else:
                deadline, patience = self.deadline, self.timeout
                if timeout is not None and time.monotonic() + timeout < deadline:  # the error names the one that ran out
                    deadline, patience = time.monotonic() + timeout, timeout
                try:
                    found = self.rings.take(self.src, self.key, self.ticket, deadline, self.name, patience,
                                            out=self.out)
                except Exception as exc:  # noqa: BLE001 - the handle's error
                    self._fail(exc)
                else:
                    self._complete(*found)
        if self._error is not None:
            raise self._error
        return self._result

    def _complete(self, array, arrived_ns, read_ns):
        try:
            if self.expect is not None:
                shape, dtype = self.expect
                if shape != array.shape:
                    raise ValueError(f"{self.name} on rank {self.rings.engine.rank}: out has shape {shape}, "
                                     f"message has {array.shape}")
                if dtype != array.dtype:
                    raise ValueError(f"{self.name} on rank {self.rings.engine.rank}: out has dtype {dtype}, message "
                                     f"has {array.dtype} (no casting: receive into a {array.dtype} buffer, or "
                                     f"without out=)")
            if self.out is not None:
                if array is not self.out:
                    np.copyto(self.out, array)
                array = self.out
            self._done, self._result = True, self.finish(array)
            self._record(array.nbytes, arrived_ns, read_ns, None)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, arrived_ns, read_ns)

    def _fail(self, error, arrived_ns=None, read_ns=0):
        self._done, self._error = True, error
        self._record(None, arrived_ns, read_ns, error)

    def _record(self, nbytes, arrived_ns, read_ns, error):
        if self.trace is not None:
            arrived = max(self.start, arrived_ns if arrived_ns is not None else now_ns())
            args = dict(self.trace, wait_us=(arrived - self.start) / 1000.0)
            if nbytes is not None and args.get("bytes") is None:
                args["bytes"] = int(nbytes)
            if error is not None:
                args["error"] = type(error).__name__
            self.rings.engine.tracer.complete("recv", "comm", "comm", self.start, arrived + read_ns, args)


__all__ = ["RingReceive"]

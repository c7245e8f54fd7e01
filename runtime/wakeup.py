"""A self-pipe that wakes a thread blocked in a ZeroMQ poll when another thread queued work."""
from __future__ import annotations

import os


class WakePipe:
    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        """Register this with a zmq.Poller (POLLIN)."""
        return self._read

    def wake(self):
        try:
            os.write(self._write, b"x")
        except BlockingIOError:  # the pipe is full: the poller is awake anyway
            pass

    def drain(self):
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self):
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass

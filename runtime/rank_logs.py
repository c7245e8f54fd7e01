"""One log file per worker: RUN/logs/rank-R.log holds everything rank R wrote (stdout and stderr);
what it writes to stderr (warnings, errors, tracebacks) also reaches the console, each line marked
`[rank R host H]`. The driver reads a log's last lines for its failure report (runtime/failure_report.py).

The launcher that starts a worker (LocalLauncher, on the driver's host or an agent's) opens the file,
so a worker's output is caught from its first byte to its last, a crash of the interpreter included.
Across hosts the run directory is on a filesystem every host sees, as `ringpipe train --hostfile` checks.
"""
from __future__ import annotations

import os
import sys
import threading
import time

def rank_log_path(log_dir: str, rank: int) -> str:
    """Where rank `rank`'s log goes in `log_dir` (the run directory's logs/ folder)."""
    return os.path.join(log_dir, f"rank-{rank}.log")


def open_rank_log(path: str, rank: int, host: str, restart: int = 0):
    """`path` opened for appending (a restarted rank's log goes on), with a line saying who starts
    now (and after how many restarts of the job); None, after one line on stderr, if it cannot be
    written here."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        log = open(path, "ab", buffering=0)
    except OSError as exc:
        sys.stderr.write(f"ringpipe: cannot write the log of rank {rank} at {path} on host {host} "
                         f"({exc.strerror}); its output goes to this console only\n")
        return None
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    again = f" (restart {restart})" if restart else ""
    log.write(f"--- ringpipe worker rank {rank} on host {host}, started {stamp}{again} ---\n".encode())
    return log


def tee_stderr(stream, log, prefix: str, echo=None) -> threading.Thread:
    """A thread copying each line of `stream` (a worker's stderr pipe) into `log` and, marked with
    `prefix`, to `echo` (default: this process's stderr), until the worker closes it; then it
    closes both."""
    def copy():
        write = echo or _to_stderr
        for raw in stream:
            if log is not None:
                try:
                    log.write(raw)
                except (OSError, ValueError):  # the disk is full or the log was closed: the console still gets it
                    pass
            line = raw.decode(errors="replace").rstrip()
            if line:
                write(f"{prefix}{line}\n")
        stream.close()
        if log is not None:
            log.close()

    thread = threading.Thread(target=copy, name="ringpipe-worker-stderr", daemon=True)
    thread.start()
    return thread


def _to_stderr(text: str):
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):  # the console went away; the log has it
        pass


def log_tail(path: str | None, lines: int = 10, max_bytes: int = 64 << 10) -> str:
    """The last `lines` lines of the log at `path` ("" if there is none or it cannot be read)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


__all__ = ["rank_log_path", "open_rank_log", "tee_stderr", "log_tail"]

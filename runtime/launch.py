"""How worker processes are started, watched and stopped: the `Launcher` seam, and `LocalLauncher`.

`Cluster` hands a launcher one bootstrap record per rank and never touches a process itself: it asks
the launcher for exit codes, pids and hosts (for its error messages), and to stop everything. Other
ways to start workers (ssh, Slurm, mpirun) implement the same protocol beside `LocalLauncher`; the
worker side is always `python -m ringpipe.runtime.worker` reading its msgpack record on stdin.
"""
from __future__ import annotations

import ctypes
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Protocol, runtime_checkable

import msgpack

from ringpipe.runtime.rank_logs import open_rank_log, tee_stderr
from ringpipe.runtime.shm import SHM_DIR

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def conventional_env(boot: dict, local_rank: int, local_world_size: int, group_rank: int = 0) -> dict:
    """The variables torchrun gives its workers, so code written for it finds what it expects:
    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK (the host's index), MASTER_ADDR and
    MASTER_PORT (the driver's control address), TORCHELASTIC_RESTART_COUNT (how often the job was
    restarted: `ringpipe train --max-restarts`, the Cluster's `restart_count`). A boot record's own
    "local_rank", "local_world_size" and "group_rank" (set by a launcher that sees every host) win
    over the arguments (this launcher's view)."""
    local_rank = boot.get("local_rank", local_rank)
    local_world_size = boot.get("local_world_size", local_world_size)
    group_rank = boot.get("group_rank", group_rank)
    address, _, port = boot["driver"].removeprefix("tcp://").rpartition(":")
    return {"RANK": str(boot["rank"]), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(boot["world_size"]),
            "LOCAL_WORLD_SIZE": str(local_world_size), "GROUP_RANK": str(group_rank),
            "MASTER_ADDR": address.strip("[]"), "MASTER_PORT": port,
            "TORCHELASTIC_RESTART_COUNT": str(boot.get("restart_count", 0))}


def reaching_this_package(environment: dict) -> dict:
    """`environment` (changed in place and returned) such that a child `python -m ringpipe...` finds
    this very package."""
    # Installed (a wheel or editable) the interpreter finds it; imported from a folder named
    # ringpipe on sys.path (tools/gpu_check.sh without an install), that folder's parent must reach
    # the child.
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.basename(package) == "ringpipe":
        environment["PYTHONPATH"] = os.pathsep.join([os.path.dirname(package),
                                                     *filter(None, [environment.get("PYTHONPATH")])])
    return environment


@runtime_checkable
class Launcher(Protocol):
    """Starts one worker per bootstrap record and answers for them by rank (0..N-1)."""

    def start(self, boots: list[dict], env: dict | None = None) -> None:
        """Start worker `rank` with `boots[rank]` (msgpack on its stdin), `env` added to its
        environment; returns at once (the driver waits for the workers to register)."""

    def poll(self, rank: int) -> int | None:
        """The worker's exit code (negative: killed by that signal), or None while it runs (or
        before it was started)."""

    def send_signal(self, rank: int, signum: int) -> None:
        """Deliver `signum` to the worker (nothing if it has already ended)."""

    def kill_all(self, grace: float = 0.0) -> None:
        """Wait up to `grace` seconds for every worker to end, then SIGTERM, then SIGKILL what is
        left; returns once they ended (or a second after each signal). Idempotent."""

    def clean_up(self, job_id: str) -> None:
        """Remove what workers of `job_id` may leave on their hosts (shared-memory files)."""

    def pid(self, rank: int) -> int | None:
        """The worker's process id on its host (None before it started)."""

    def host(self, rank: int) -> str:
        """The name of the host the worker runs on, for messages."""

    def process_note(self, rank: int) -> str:
        """A short note on the worker's process state worth a message (" (its process is
        stopped, ...)"), or "" when there is nothing to say or no way to tell."""


class LocalLauncher:
    """Workers as child processes of the driver, on this host (`subprocess.Popen`). Every worker
    gets `host_name` as its host identity (same-host peers share memory) unless its boot record
    already names one. A boot record with a "log_path" sends the worker's stdout and stderr to that
    file, and its stderr lines also to `echo` (default: this process's stderr) marked with its rank
    and host (runtime/rank_logs.py).

    Each worker leads a process group of its own and dies with this process (see `die_with_parent`;
    Linux ties that to the thread that started it, so start workers from a thread that outlives them)."""

    def __init__(self, host_name: str | None = None, group_rank: int = 0, echo=None):
        self.processes: list[subprocess.Popen] = []
        self.host_name, self.group_rank, self.echo = host_name or socket.gethostname(), group_rank, echo

    def start(self, boots: list[dict], env: dict | None = None) -> None:
        environment = reaching_this_package(dict(os.environ, **(env or {})))
        for local_rank, boot in enumerate(boots):
            boot = dict(boot, host=boot.get("host") or self.host_name, launcher_pid=os.getpid(),
                        local_rank=boot.get("local_rank", local_rank),
                        local_world_size=boot.get("local_world_size", len(boots)))
            worker_env = dict(environment, **conventional_env(boot, local_rank, len(boots), self.group_rank))
            for var in BLAS_THREAD_VARIABLES:
                worker_env[var] = str(boot["threads"])
            log = (open_rank_log(boot["log_path"], boot["rank"], boot["host"], int(boot.get("restart_count", 0)))
                   if boot.get("log_path") else None)
            if log is not None:
                worker_env["PYTHONUNBUFFERED"] = "1"  # a killed worker's last prints are in its log
            # A new session: Ctrl-C in the terminal reaches the driver only, which then stops workers;
            # and the worker's own children share its process group, which `stop_processes` ends.
            proc = subprocess.Popen([sys.executable, "-m", "ringpipe.runtime.worker"], stdin=subprocess.PIPE,
                                    env=worker_env, start_new_session=True, stdout=log,
                                    stderr=subprocess.PIPE if log is not None else None)
            proc.leads_group = True
            if log is not None:  # the worker has its own descriptor now; the copying thread owns this one
                tee_stderr(proc.stderr, log, f"[rank {boot['rank']} host {boot['host']}] ", self.echo)
            proc.stdin.write(msgpack.packb(boot, use_bin_type=True))
            proc.stdin.close()
            self.processes.append(proc)

    def poll(self, rank: int) -> int | None:
        return self.processes[rank].poll() if rank < len(self.processes) else None

    def send_signal(self, rank: int, signum: int) -> None:
        proc = self.processes[rank] if rank < len(self.processes) else None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def kill_all(self, grace: float = 0.0) -> None:
        stop_processes(self.processes, grace)

    def clean_up(self, job_id: str) -> None:
        remove_shm_files(job_id)

    def pid(self, rank: int) -> int | None:
        return self.processes[rank].pid if rank < len(self.processes) else None

    def host(self, rank: int) -> str:
        return self.host_name

    def process_note(self, rank: int) -> str:
        pid = self.pid(rank)
        return "" if pid is None else local_process_note(pid)


def stop_workers(launcher: Launcher, job_id: str, grace: float = 0.0):
    """Stop every worker of `launcher` (after `grace` seconds to end on their own) and clean up their
    hosts. Also a cluster's finalizer, should it never be closed: it holds the launcher, not the cluster."""
    launcher.kill_all(grace)
    launcher.clean_up(job_id)


def stop_processes(processes: list[subprocess.Popen], grace: float = 0.0):
    """Wait up to `grace` seconds for `processes` to end, then SIGTERM and SIGKILL what is left.
    A process that leads a process group (`leads_group`) is signalled with its whole group, so
    that what it started itself ends too, even after it ended."""
    deadline = time.monotonic() + grace
    for proc in processes:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in processes if p.poll() is None]
        for proc in alive:
            _signal_group(proc, sig)
            if sig == signal.SIGTERM:  # a stopped (SIGSTOP) process acts on it only once continued
                _signal_group(proc, signal.SIGCONT)
        for proc in alive:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    for proc in processes:  # what a group's leader left running when it ended
        if proc.returncode is not None and getattr(proc, "leads_group", False):
            _signal_group(proc, signal.SIGKILL)
            proc.leads_group = False  # once: later, that group id may be another's


def _signal_group(proc: subprocess.Popen, sig: int):
    """`sig` to `proc`'s process group if it leads one (`leads_group`, set by whoever started it
    with start_new_session), else to `proc` alone."""
    try:
        if getattr(proc, "leads_group", False):
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def die_with_parent(parent_pid: int | None, signum: int = signal.SIGKILL) -> bool:
    """Have Linux send `signum` to this process when its parent ends (prctl PR_SET_PDEATHSIG), so
    that a killed driver or agent leaves no worker behind; ends this process at once if the parent
    (`parent_pid`, when known) ended before the request. False where this cannot be asked (not Linux).

    Linux sends the signal when the *thread* that started this process ends: a launcher must start
    workers from a thread that lives as long as they do (its main thread)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
    return True


def remove_shm_files(job_id: str):
    """Unlink this host's shared-memory files of `job_id` (workers unlink their own once every peer
    has mapped them; this catches those of workers that died before)."""
    for path in glob.glob(os.path.join(SHM_DIR, f"ringpipe-{job_id}-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def local_process_note(pid: int) -> str:
    """ " (its process is stopped ...)" if /proc says so (a local, SIGSTOPped worker); else nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return " (its process is stopped, e.g. by SIGSTOP)" if state in ("T", "t") else ""


__all__ = ["Launcher", "LocalLauncher", "stop_processes", "die_with_parent"]

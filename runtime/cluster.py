"""The driver side: start N worker processes, run SPMD functions and actors on them, watch them.

    with Cluster(world_size=4) as cluster:
        results = cluster.run(fn, x)          # fn(comm, x) on every rank, results ordered by rank
        trainers = cluster.spawn(Trainer, cfg)  # Trainer(comm, cfg) on every rank
        losses = trainers.train_step(0).result()

A worker that raises makes the call fail with `RemoteError` (rank + remote traceback) and aborts
the communication of the other ranks, so nobody hangs; the cluster stays usable. A worker that
dies (exit, signal) is noticed within a fraction of a second: the driver raises `WorkerDied` and
stops every other worker. Each worker's engine thread sends a heartbeat every second, whatever its
compute thread is doing: a worker silent for `heartbeat_timeout` seconds (stopped, or its host
gone) raises `WorkerUnresponsive`; a live worker that makes no progress in a call the others gave up
on (they timed out waiting for it, or the call failed elsewhere) raises `WorkerStuck` with its Python
stack. Either way every worker is stopped. `close()` leaves no process and no shared-memory file behind.
Every failure a call raises carries a `report`: the first failure, then what became of the other
ranks (runtime/failure_report.py). With `log_dir`, each rank's output goes to its own log file
(runtime/rank_logs.py).
"""
from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import secrets
import threading
import time
import weakref

import zmq

from ringpipe.runtime import addresses, calls, wire
from ringpipe.runtime.auth import JobKeys, raise_descriptor_limit
from ringpipe.runtime.calls import (ActorGroup, CallFuture, ClusterStopped, RemoteError, WorkerDied, WorkerLost, WorkerStuck,
                           WorkerUnresponsive, reference)
from ringpipe.runtime.cluster_options import check_cluster_options
from ringpipe.runtime.cluster_startup import StartUp
from ringpipe.runtime.cluster_trace import TraceControl
from ringpipe.runtime.failure_report import report_lost_worker, report_remote_error
from ringpipe.runtime.rank_logs import rank_log_path
from ringpipe.runtime.communicator import CommConfig
from ringpipe.runtime.launch import Launcher, LocalLauncher, stop_workers
from ringpipe.runtime.liveness import LivenessMonitor
from ringpipe.runtime.shm import arena_path, shm_available
from ringpipe.runtime.wakeup import WakePipe

DEFAULT_ARENA_BYTES = 1 << 30  # sparse: only the pages a worker touches use memory


class Cluster(StartUp, TraceControl):
    """N worker processes (started by a `Launcher`; local ones by default) plus the driver's
    control plane. Use as a context manager."""

    def __init__(self, world_size: int, *, timeout: float = 60.0, shm: bool = True, algorithm: str = "auto",
                 threads_per_worker: int | None = None, bind_host: str = "127.0.0.1",
                 start_timeout: float = 60.0, arena_bytes: int = DEFAULT_ARENA_BYTES, env: dict | None = None,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 8.0, stuck_grace: float = 3.0,
                 launcher: Launcher | None = None, log_dir: str | None = None,
                 restart_count: int = 0, cpu_bind: str | None = None, **comm_options):
        """`timeout`: seconds a communication operation may wait for a peer. A worker that sends nothing for
        `heartbeat_timeout` seconds is reported as unresponsive (heartbeats come every `heartbeat_interval`); a worker
        still inside a call `stuck_grace` seconds after the others timed out waiting for it (or `timeout +
        stuck_grace` after the call failed elsewhere) is reported as stuck, with its stack. `launcher` starts and
        stops the worker processes (default: `LocalLauncher`, child processes on this host); `env` is added to their
        environment. `restart_count`: the job's restarts so far (TORCHELASTIC_RESTART_COUNT). `log_dir`: each rank's
        stdout and stderr go to `log_dir`/rank-R.log (runtime/rank_logs.py). `cpu_bind`: "auto", "core" or "none"
        (runtime/cpu_binding.py; default $RINGPIPE_CPU_BIND, else auto). Every failure a call raises carries a
        `report` (runtime/failure_report.py). Every option is checked before a worker starts
        (runtime/cluster_options.py): a ValueError names the first one out of range (e.g. `timeout` must be above 0,
        `arena_bytes` at least 1 MiB)."""
        if calls.importing_main is not None:  # a worker re-running the script: it would start workers too
            raise RuntimeError(f"Cluster started while a worker imports the driver's script {calls.importing_main} "
                               "to find its function: guard the script's entry point with "
                               "`if __name__ == \"__main__\":` (workers import the script, as multiprocessing's do)")
        check_cluster_options(world_size, timeout, shm, algorithm, threads_per_worker, bind_host, start_timeout,
                              arena_bytes, env, heartbeat_interval, heartbeat_timeout, stuck_grace, log_dir,
                              restart_count, comm_options, cpu_bind)
        self.world_size, self.restart_count, self.cpu_bind = world_size, restart_count, cpu_bind
        self.job_id = secrets.token_hex(6)
        self.comm_config = CommConfig(timeout=timeout, shm=shm and shm_available(), algorithm=algorithm,
                                      **comm_options)
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
        self.heartbeat_interval, self.heartbeat_timeout, self.stuck_grace = \
            heartbeat_interval, heartbeat_timeout, stuck_grace
        raise_descriptor_limit()
        self._closed = False  # no more calls; the driver thread ends
        self._released = False  # close() has run: no process, socket or thread of ours is left
        self._failure: Exception | None = None
        self._ids = itertools.count()
        self._dropped_actors = collections.deque()  # (actor, ranks) no handle refers to (calls.ActorGroup)
        self._pending: dict[int, CallFuture] = {}
        self._running: dict[int, str] = {}  # rank -> name of the call it is running
        self._fatal: dict[int, str] = {}
        self._epoch = 0
        self._fence_needed = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = WakePipe()
        self._clock_replies: dict[int, int] = {}
        self.log_paths = [rank_log_path(log_dir, r) if log_dir else None for r in range(world_size)]
        self.launcher = launcher if launcher is not None else LocalLauncher()
        self._liveness = LivenessMonitor(world_size, self.launcher, heartbeat_timeout, stuck_grace,
                                         self.comm_config.timeout, self._ask_stack)
        self._lock = threading.Lock()
        self.keys = JobKeys.generate()
        self._context = addresses.dual_stack(zmq.Context())
        self._auth = self.keys.start_authenticator(self._context)
        self._router = self._context.socket(zmq.ROUTER)
        self.keys.make_server(self._router)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self._router.bind_to_random_port(addresses.tcp_address(bind_host))
        self.address = addresses.tcp_address(bind_host, port)
        self.worker_addresses: list[dict] = []
        self._finalizer = weakref.finalize(self, stop_workers, self.launcher, self.job_id)
        atexit.register(self._finalizer)
        try:
            self._start_workers(bind_host, start_timeout, arena_bytes, env)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="ringpipe-driver", daemon=True)
        self._thread.start()

    def _parse(self, frames):
        identity, rank = frames[0], None
        try:
            rank = int(identity[1:]) if identity[:1] == b"w" else None
            if rank is None or not 0 <= rank < self.world_size:
                raise wire.WireError(f"unknown identity {identity[:16]!r}")
            value = wire.decode(frames[1:])
            if not isinstance(value, dict):
                raise wire.WireError("control message is not a map")
            return rank, value
        except (wire.WireError, ValueError) as exc:
            logging.getLogger("ringpipe.runtime").error("driver: rejected a control message: %s", exc)
            self._fail_rejected_result(rank, frames, exc)
            return None, None

    def _fail_rejected_result(self, rank, frames, exc):
        """A rejected result still names its call: fail that call on that rank instead of waiting
        for a reply that will never come."""
        if rank is None or not 0 <= rank < self.world_size or len(frames) < 2:
            return
        kind, call_id = wire.peek_call(bytes(frames[1]))
        if kind != "result" or not isinstance(call_id, int):
            return
        self._on_message(rank, {"t": "result", "id": call_id, "ok": False, "type": "WireError", "aborted": False,
                                "error": f"WireError: the driver rejected the result: {exc}", "traceback": ""})

    def _send_to(self, rank: int, value, gone_ok: bool = False):
        try:
            self._router.send_multipart([b"w%d" % rank, *wire.encode(value)])
        except zmq.ZMQError as exc:  # gone_ok: a worker that is gone (EHOSTUNREACH) is _check_processes' to report
            if not gone_ok or exc.errno != zmq.EHOSTUNREACH:
                raise

    def _broadcast(self, value, ranks=None):
        for rank in range(self.world_size) if ranks is None else ranks:
            self._send_to(rank, value, gone_ok=True)  # an abort may find the rank that failed already exited

    # ---- the driver thread -----------------------------------------------------------------------
    def _serve(self):
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        while not self._closed:
            try:
                events = dict(poller.poll(20))
                if self._wakeup.fileno() in events:
                    self._wakeup.drain()
                while True:
                    try:
                        rank, value = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    if callable(value):
                        value()
                        continue
                    self._send_to(rank, value, gone_ok=True)
                drained = self._receive_all() if self._router in events else True
                self._check_processes()
                if drained:  # judge silence only once every message that arrived has been read
                    self._check_liveness()
            except WorkerLost as lost:
                self._die(lost)
                return
            except zmq.ZMQError as exc:
                if self._closed:
                    return
                self._die(WorkerLost(f"the driver's control socket failed: {exc}; all workers stopped"))
                return
            except Exception as exc:  # noqa: BLE001 - a dead driver thread would hang every caller
                logging.getLogger("ringpipe.runtime").exception("driver thread failed")
                self._die(WorkerLost(f"the driver thread failed: {type(exc).__name__}: {exc}; "
                                     "all workers stopped"))
                return

    def _receive_all(self) -> bool:
        """Handle what has arrived (at most 100 messages); True if nothing more is waiting."""
        for _ in range(100):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            rank, value = self._parse(frames)
            if rank is not None:
                self._on_message(rank, value)
        return False

    def _post(self, rank, value):
        """Queue a message (or a callable to run) for the driver thread."""
        self._outbox.put((rank, value))
        self._wakeup.wake()

    def _on_message(self, rank, value):
        kind = value.get("t")
        self._liveness.heard(rank, value)
        if kind == "clock":
            self._clock_replies[rank] = int(value.get("time", 0))
        elif kind == "fatal":
            self._fatal[rank] = value.get("traceback", "")
        elif kind == "result":
            with self._lock:
                future = self._pending.get(value.get("id"))
                self._running.pop(rank, None)
            if value.get("fence"):
                with self._lock:
                    self._fence_needed = True
            if future is None:
                return
            if value.get("ok"):
                future._set(rank, True, value.get("value"))
            else:
                self._fatal[rank], value["seen"] = value.get("traceback", ""), time.time()
                if future.failed_at is None:
                    future.failed_at = time.monotonic()
                for peer in value.get("waited_for") or []:
                    if isinstance(peer, int):
                        future.blamed.setdefault(peer, rank)
                if not future.errors and not value.get("aborted"):
                    # First failure of this call: stop the other ranks' communication so none hangs.
                    self._abort(f"call {future.name} failed on rank {rank}", future.call_id)
                future._set(rank, False, value)
            if future.done():
                with self._lock:
                    self._pending.pop(future.call_id, None)

    def _abort(self, reason: str, call_id: int):
        """Driver thread: fail every rank's communication in flight and start a new epoch. Naming
        the failed call lets a rank that has not started it yet still fail its communication."""
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            self._fence_needed = True
        self._broadcast({"t": "abort", "epoch": epoch, "reason": reason, "call": call_id})

    def _check_processes(self, starting: bool = False):
        for rank in range(self.world_size):
            code = self.launcher.poll(rank)
            if code is not None and not self._closed:
                raise WorkerDied(rank, self.launcher.pid(rank), code, self._fatal.get(rank, ""),
                                 self._running.get(rank) or ("start-up" if starting else None), self.launcher.host(rank))

    def _check_liveness(self):
        with self._lock:
            failed = [f for f in self._pending.values() if f.failed_at is not None and not f.done()]
        self._liveness.check(self._running, failed)

    def _ask_stack(self, rank: int):
        try:
            self._send_to(rank, {"t": "stack"})
        except zmq.ZMQError:  # unreachable: the liveness monitor reports it without a stack
            pass

    def _die(self, died: WorkerLost):
        when, self._failure = time.time(), died
        ended_before = {rank: self.launcher.poll(rank) for rank in range(self.world_size)}
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        self._terminate()
        died.report = report_lost_worker(
            died, self.launcher, self.world_size, ended_before, self._fatal,
            lambda rank: self._liveness.doing(rank, self._running), self.log_paths,
            {rank: error for future in pending for rank, error in future.errors.items()}, when)
        for future in pending:
            future._fail(died)

    def report_call_failure(self, errors: dict, rank: int, call: str):
        """The FailureReport of a call that raised on `rank` (`errors`: every rank's error reply)."""
        return report_remote_error(errors, rank, call, self.launcher, self.log_paths)

    # ---- calls -------------------------------------------------------------------------------------
    def _call(self, kind, target, args, kwargs, ranks, actor=None, method=None, name=None) -> CallFuture:
        calls.drop_unreferenced_actors(self, kind)
        if self._failure is not None:
            raise ClusterStopped(self._failure)
        if self._closed:
            raise RuntimeError("cluster is closed")
        ranks = list(range(self.world_size)) if ranks is None else sorted(set(int(r) for r in ranks))
        if not ranks or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"ranks {ranks} must be a non-empty subset of 0..{self.world_size - 1}")
        message = {"t": "call", "id": next(self._ids), "kind": kind, "target": target, "args": list(args),
                   "kwargs": kwargs, "actor": actor, "method": method, "name": name or kind}
        wire.encode(message)  # fail here, in the caller, if an argument cannot be sent
        future = CallFuture(self, message["id"], ranks, name or kind)
        with self._lock:
            if self._fence_needed and not self._pending:
                # A call failed before: ranks that went on communicating after the abort may have
                # left messages behind. One more epoch, taken when nothing runs, drops them all.
                self._fence_needed = False
                self._epoch += 1
                for rank in range(self.world_size):
                    self._post(rank, {"t": "abort", "epoch": self._epoch, "reason": "fence"})
            self._pending[message["id"]] = future
            for rank in ranks:
                self._running[rank] = future.name
        for rank in ranks:
            self._post(rank, message)
        return future

    def interrupt(self, future: CallFuture):
        """Give up on call `future` (Ctrl-C in the driver): its communication is aborted and its
        ranks' code gets KeyboardInterrupt (runtime/worker.py), so the next call starts at once."""
        if future.done() or self._closed:
            return
        reason = f"call {future.name} was interrupted in the driver (KeyboardInterrupt)"
        self._post(None, lambda: (self._abort(reason, future.call_id),
                                  self._broadcast({"t": "interrupt", "call": future.call_id}, future.ranks)))

    def submit(self, fn, *args, ranks=None, **kwargs) -> CallFuture:
        """Start `fn(comm, *args, **kwargs)` on every rank (or `ranks`); returns a CallFuture."""
        return self._call("run", reference(fn), args, kwargs, ranks, name=getattr(fn, "__qualname__", "fn"))

    def run(self, fn, *args, ranks=None, timeout: float | None = None, **kwargs) -> list:
        """Run `fn(comm, *args, **kwargs)` on every rank (SPMD); returns the results ordered by rank."""
        calls.check_wait_timeout(getattr(fn, "__qualname__", "fn"), timeout)  # before the call starts
        return self.submit(fn, *args, ranks=ranks, **kwargs).result(timeout)

    def spawn(self, cls, *args, ranks=None, **kwargs) -> ActorGroup:
        """Create `cls(comm, *args, **kwargs)` on every rank (or `ranks`); returns its handle."""
        actor_id = next(self._ids)
        name = getattr(cls, "__qualname__", "actor")
        self._call("spawn", reference(cls), args, kwargs, ranks, actor=actor_id, name=f"{name}()").result()
        ranks = list(range(self.world_size)) if ranks is None else sorted(set(ranks))
        return ActorGroup(self, actor_id, ranks, name)

    # ---- shutdown -----------------------------------------------------------------------------------
    def close(self):
        """Stop every worker (politely, then by force) and release every resource. Idempotent.

        After a lost worker the driver thread is already stopping the others: this waits for it,
        so that no worker is left running when close() returns."""
        if self._released:
            return
        self._released = True
        self._closed = True
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)  # the router is this thread's alone from here on
        for rank in range(self.world_size):
            if self.launcher.poll(rank) is None:
                try:
                    self._send_to(rank, {"t": "stop"})
                except zmq.ZMQError:
                    pass
        self._terminate(grace=2.0)
        try:
            self._auth.stop()
        except Exception:  # noqa: BLE001
            pass
        self._context.destroy(linger=0)
        self._wakeup.close()
        self._finalizer()

    def _terminate(self, grace: float = 0.0):
        self._closed = True
        stop_workers(self.launcher, self.job_id, grace)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def failure(self) -> Exception | None:
        return self._failure

    @property
    def pids(self) -> list[int | None]:
        """Each rank's worker process id (on its host), ordered by rank."""
        return [self.launcher.pid(rank) for rank in range(self.world_size)]


__all__ = ["Cluster", "RemoteError", "WorkerLost", "WorkerDied", "WorkerUnresponsive", "WorkerStuck",
           "ClusterStopped", "CallFuture", "ActorGroup", "arena_path"]

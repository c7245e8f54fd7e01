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
"""
from __future__ import annotations

import atexit
import glob
import itertools
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict

import msgpack
import zmq

from runtime import wire
from runtime.auth import JobKeys, raise_descriptor_limit
from runtime.communicator import CommConfig
from runtime.files import write_json
from runtime.shm import SHM_DIR, arena_path, shm_available
from runtime.wakeup import WakePipe

DEFAULT_ARENA_BYTES = 1 << 30  # sparse: only the pages a worker touches use memory


class RemoteError(RuntimeError):
    """A call raised on a worker; carries the rank and the remote traceback."""

    def __init__(self, rank: int, exc_type: str, message: str, remote_traceback: str, call: str):
        self.rank, self.exc_type, self.remote_traceback, self.call = rank, exc_type, remote_traceback, call
        super().__init__(f"rank {rank} raised {message} in {call}\n"
                         f"--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}")


class WorkerLost(RuntimeError):
    """A worker can no longer take part (died, silent or stuck): every worker has been stopped.

    `rank`, `pid` and `call` (the call it was running, or None) name it where known."""

    def __init__(self, message: str, rank: int | None = None, pid: int | None = None, call: str | None = None):
        self.rank, self.pid, self.call = rank, pid, call
        super().__init__(message)


class WorkerDied(WorkerLost):
    """A worker process ended while the cluster was running."""

    def __init__(self, rank: int, pid: int, returncode: int, remote_traceback: str, call: str | None):
        self.returncode = returncode
        how = (f"was killed by signal {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited with code {returncode}")
        during = f" while running {call}" if call else ""
        tb = (f"\n--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}" if remote_traceback
              else " (no traceback: the process ended without raising)")
        super().__init__(f"worker rank {rank} (pid {pid}) {how}{during}; all workers stopped.{tb}", rank, pid, call)


class WorkerUnresponsive(WorkerLost, TimeoutError):
    """A worker sent nothing (not even a heartbeat) for too long: stopped, wedged, or its host gone."""


class WorkerStuck(WorkerLost):
    """A live worker made no progress in a call that the other ranks gave up on; `stack` is where
    its compute thread was."""

    def __init__(self, message: str, rank: int, pid: int, call: str | None, stack: str):
        self.stack = stack
        super().__init__(message, rank, pid, call)


class ClusterStopped(WorkerLost):
    """A call on a cluster that a lost worker stopped earlier; `cause` is that first failure."""

    def __init__(self, cause: Exception):
        self.cause = cause
        super().__init__(f"cluster is stopped: {str(cause).splitlines()[0]}", getattr(cause, "rank", None),
                         getattr(cause, "pid", None), getattr(cause, "call", None))


def reference(target) -> dict:
    """How a worker finds `target`: module + qualified name (module-level functions/classes only)."""
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if module is None or "<" in qualname:
        raise TypeError(f"{target!r} must be a module-level function or class so workers can import it")
    main = None
    if module == "__main__":
        main = getattr(sys.modules["__main__"], "__file__", None)
        main = os.path.abspath(main) if main else None
    return {"module": module, "qualname": qualname, "main": main}


class CallFuture:
    """Results of one call on several ranks; `result()` returns them ordered by rank."""

    def __init__(self, cluster: "Cluster", call_id: int, ranks: list[int], name: str, single: bool = False):
        self.cluster, self.call_id, self.ranks, self.name, self.single = cluster, call_id, ranks, name, single
        self.values: dict[int, object] = {}
        self.errors: dict[int, dict] = {}
        self.died: Exception | None = None
        self._done = threading.Event()
        # Set by the driver thread when the call first fails: the time, and the peers that ranks
        # timed out waiting for (peer -> one rank that waited), to tell a stuck rank from a slow one.
        self.failed_at: float | None = None
        self.blamed: dict[int, int] = {}

    def _set(self, rank, ok, value):
        if ok:
            self.values[rank] = value
        else:
            self.errors[rank] = value
        if len(self.values) + len(self.errors) == len(self.ranks):
            self._done.set()

    def _fail(self, error: Exception):
        self.died = error
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.05):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no result after {timeout}s")
            thread = getattr(self.cluster, "_thread", None)
            if thread is not None and not thread.is_alive() and not self._done.is_set():
                # Nobody is left to deliver the result (the driver thread ended or the cluster closed).
                raise ClusterStopped(self.cluster._failure or RuntimeError("the cluster was closed"))
        if self.died is not None:
            raise self.died
        if self.errors:
            # The root cause is a rank that failed on its own, not one aborted because of it.
            causes = {r: e for r, e in self.errors.items() if not e.get("aborted")} or self.errors
            rank = min(causes)
            err = causes[rank]
            raise RemoteError(rank, err.get("type", "Error"), err.get("error", ""), err.get("traceback", ""), self.name)
        values = [self.values[r] for r in self.ranks]
        return values[0] if self.single else values


class ActorGroup:
    """Handle on one actor instance per rank; `group.method(*args)` returns a CallFuture."""

    def __init__(self, cluster: "Cluster", actor_id: int, ranks: list[int], name: str):
        self._cluster, self._actor_id, self._ranks, self._name = cluster, actor_id, ranks, name

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args, **kwargs) -> CallFuture:
            future = self._cluster._call("method", None, args, kwargs, self._ranks, actor=self._actor_id,
                                         method=method, name=f"{self._name}.{method}")
            future.single = self._single
            return future

        return call

    _single = False

    def __getitem__(self, rank: int) -> "ActorGroup":
        """The instance on one rank: its calls' results are single values, not lists."""
        if rank not in self._ranks:
            raise IndexError(f"actor {self._name} has no instance on rank {rank}")
        single = ActorGroup(self._cluster, self._actor_id, [rank], self._name)
        single._single = True
        return single


class Cluster:
    """N local worker processes plus the driver's control plane. Use as a context manager."""

    def __init__(self, world_size: int, *, timeout: float = 60.0, shm: bool = True, algorithm: str = "auto",
                 threads_per_worker: int | None = None, bind_host: str = "127.0.0.1",
                 start_timeout: float = 60.0, arena_bytes: int = DEFAULT_ARENA_BYTES, env: dict | None = None,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 8.0, stuck_grace: float = 3.0,
                 **comm_options):
        """`timeout`: seconds a communication operation may wait for a peer. A worker that sends
        nothing for `heartbeat_timeout` seconds is reported as unresponsive (heartbeats come every
        `heartbeat_interval`); a worker still inside a call `stuck_grace` seconds after the others
        timed out waiting for it (or `timeout + stuck_grace` after the call failed elsewhere) is
        reported as stuck, with its stack."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if algorithm not in ("auto", "direct", "ring", "shm"):
            raise ValueError(f"algorithm must be auto, direct, ring or shm, got {algorithm!r}")
        self.world_size = world_size
        self.job_id = secrets.token_hex(6)
        self.comm_config = CommConfig(timeout=timeout, shm=shm and shm_available(), algorithm=algorithm,
                                      **comm_options)
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(f"heartbeat_interval {heartbeat_interval!r} must be positive and below "
                             f"heartbeat_timeout {heartbeat_timeout!r}")
        self.heartbeat_interval, self.heartbeat_timeout, self.stuck_grace = \
            heartbeat_interval, heartbeat_timeout, stuck_grace
        raise_descriptor_limit()
        self._closed = False  # no more calls; the driver thread ends
        self._released = False  # close() has run: no process, socket or thread of ours is left
        self._failure: Exception | None = None
        self._ids = itertools.count()
        self._pending: dict[int, CallFuture] = {}
        self._running: dict[int, str] = {}  # rank -> name of the call it is running
        self._fatal: dict[int, str] = {}
        self._epoch = 0
        self._fence_needed = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = WakePipe()
        self._clock_replies: dict[int, int] = {}
        # Liveness, kept by the driver thread: when each rank was last heard from, its last
        # heartbeat, and the stacks asked of ranks that seem stuck ((call id, rank) -> time asked;
        # rank -> the stack's text).
        self._last_heard: dict[int, float] = {}
        self._beats: dict[int, dict] = {}
        self._stack_asked: dict[tuple, float] = {}
        self._stacks: dict[int, str] = {}
        self._last_check = time.monotonic()
        self._lock = threading.Lock()
        self.keys = JobKeys.generate()
        self._context = zmq.Context()
        self._auth = self.keys.start_authenticator(self._context)
        self._router = self._context.socket(zmq.ROUTER)
        self.keys.make_server(self._router)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self._router.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self.processes: list[subprocess.Popen] = []
        self.worker_addresses: list[dict] = []
        self._finalizer = weakref.finalize(self, Cluster._cleanup, self.processes, self.job_id)
        atexit.register(self._finalizer)
        try:
            self._start_workers(bind_host, start_timeout, arena_bytes, env)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="ringpipe-driver", daemon=True)
        self._thread.start()

    # ---- start-up ----------------------------------------------------------------------------------
    def _start_workers(self, bind_host, start_timeout, arena_bytes, extra_env):
        env = dict(os.environ)
        env.update(extra_env or {})
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(self.threads_per_worker)
        # `python -m runtime.worker` must find this very package, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
        for rank in range(self.world_size):
            boot = {"rank": rank, "world_size": self.world_size, "job_id": self.job_id, "driver": self.address,
                    "keys": self.keys.to_dict(), "bind_host": bind_host, "comm": asdict(self.comm_config),
                    "sys_path": list(sys.path), "cwd": os.getcwd(), "threads": self.threads_per_worker,
                    "start_timeout": start_timeout, "arena_bytes": arena_bytes,
                    "heartbeat_interval": self.heartbeat_interval}
            # A new session: Ctrl-C in the terminal reaches the driver only, which then stops workers.
            proc = subprocess.Popen([sys.executable, "-m", "runtime.worker"], stdin=subprocess.PIPE, env=env,
                                    start_new_session=True)
            proc.stdin.write(msgpack.packb(boot, use_bin_type=True))
            proc.stdin.close()
            self.processes.append(proc)
        registered = self._gather("register", start_timeout)
        self.worker_addresses = [registered[r] for r in range(self.world_size)]
        book = [{"rank": r, "data": e["data"], "host": e["host"], "arena": e["arena"]}
                for r, e in enumerate(self.worker_addresses)]
        self._broadcast({"t": "book", "peers": book})
        self._gather("ready", start_timeout)
        self._broadcast({"t": "unlink"})
        self._gather("unlinked", start_timeout)
        now = time.monotonic()
        self._last_heard = {rank: now for rank in range(self.world_size)}
        self._last_check = now

    def _gather(self, kind: str, timeout: float) -> dict[int, dict]:
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            self._check_processes(starting=True)
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(got))
                pids = [self.processes[r].pid for r in missing]
                raise WorkerUnresponsive(f"worker ranks {missing} (pids {pids}) did not send '{kind}' within "
                                         f"{timeout}s of start-up", missing[0], pids[0], "start-up")
            if not self._router.poll(50):
                continue
            frames = self._router.recv_multipart()
            rank, value = self._parse(frames)
            if rank is None:
                continue
            if value.get("t") == "fatal":
                self._fatal[rank] = value.get("traceback", "")
                continue
            if value.get("t") != kind:
                raise RuntimeError(f"worker rank {rank} sent {value.get('t')!r} while starting, expected {kind!r}")
            got[rank] = value
        return got

    def _parse(self, frames):
        identity = frames[0]
        try:
            rank = int(identity[1:]) if identity[:1] == b"w" else None
            if rank is None or not 0 <= rank < self.world_size:
                raise wire.WireError(f"unknown identity {identity[:16]!r}")
            value = wire.decode(frames[1:])
            if not isinstance(value, dict):
                raise wire.WireError("control message is not a map")
            return rank, value
        except (wire.WireError, ValueError) as exc:
            import logging

            logging.getLogger("ringpipe.runtime").error("driver: rejected a control message: %s", exc)
            return None, None

    def _send_to(self, rank: int, value):
        self._router.send_multipart([b"w%d" % rank, *wire.encode(value)])

    def _broadcast(self, value, ranks=None):
        for rank in range(self.world_size) if ranks is None else ranks:
            self._send_to(rank, value)

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
                    try:
                        self._send_to(rank, value)
                    except zmq.ZMQError as exc:  # that worker is gone; _check_processes reports it
                        if exc.errno != zmq.EHOSTUNREACH:
                            raise
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
        self._last_heard[rank] = time.monotonic()
        if kind == "beat":
            self._beats[rank] = value
        elif kind == "stack":
            self._stacks[rank] = str(value.get("text", ""))
        elif kind == "clock":
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
                self._fatal[rank] = value.get("traceback", "")
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
        for rank, proc in enumerate(self.processes):
            code = proc.poll()
            if code is not None and not self._closed:
                raise WorkerDied(rank, proc.pid, code, self._fatal.get(rank, ""), self._running.get(rank)
                                 or ("start-up" if starting else None))

    # ---- liveness (driver thread) ---------------------------------------------------------------------
    def _check_liveness(self):
        now = time.monotonic()
        stalled = now - self._last_check
        self._last_check = now
        if stalled > 1.0:
            # The driver itself was not listening (its process paused or starved): that time is
            # nobody's silence, so it does not count against the workers.
            for rank in self._last_heard:
                self._last_heard[rank] += stalled
        for rank, heard in self._last_heard.items():
            silent = now - heard
            if silent > self.heartbeat_timeout and self.processes[rank].poll() is None:
                pid = self.processes[rank].pid
                call = self._running.get(rank)
                raise WorkerUnresponsive(
                    f"worker rank {rank} (pid {pid}) sent no heartbeat for {silent:.1f}s"
                    f"{_process_state(pid)}; it was last heard {self._doing(rank)}; all workers stopped",
                    rank, pid, call)
        self._check_stuck(now)

    def _check_stuck(self, now: float):
        """A rank still inside a call the others gave up on is stuck: ask for its stack, report it."""
        with self._lock:
            failed = [f for f in self._pending.values() if f.failed_at is not None and not f.done()]
        for future in failed:
            for rank in future.ranks:
                if rank in future.values or rank in future.errors:
                    continue
                waited_by = future.blamed.get(rank)
                # Ranks timed out waiting for this one: it already had the full communication
                # timeout. Otherwise it may still be computing towards its next collective.
                allowance = self.stuck_grace + (0.0 if waited_by is not None else self.comm_config.timeout)
                if now < future.failed_at + allowance:
                    continue
                asked = self._stack_asked.get((future.call_id, rank))
                if asked is None:
                    self._stack_asked[(future.call_id, rank)] = now
                    self._stacks.pop(rank, None)
                    try:
                        self._send_to(rank, {"t": "stack"})
                    except zmq.ZMQError:  # unreachable: reported without a stack below
                        pass
                    continue
                if rank not in self._stacks and now - asked < 2.0:
                    continue
                pid = self.processes[rank].pid
                stack = self._stacks.get(rank) or f"(no stack: rank {rank} did not answer{_process_state(pid)})"
                cause = future.errors[waited_by if waited_by is not None else min(future.errors)]
                why = (f"rank {waited_by} timed out waiting for it" if waited_by is not None
                       else f"the call failed on rank {min(future.errors)}")
                error = " ".join(str(cause.get("error", "")).split())[:300]
                raise WorkerStuck(
                    f"worker rank {rank} (pid {pid}) made no progress in {future.name}: {why} "
                    f"({error}) and it had not returned {now - future.failed_at:.1f}s later; it is "
                    f"{self._doing(rank)}; all workers stopped.\n--- stack of rank {rank} (pid {pid}) ---\n"
                    f"{stack.rstrip()}", rank, pid, future.name, stack)

    def _doing(self, rank: int) -> str:
        """What the rank was doing as far as the driver knows: its call, and what its last heartbeat said."""
        beat = self._beats.get(rank) or {}
        if not beat.get("name"):
            queued = self._running.get(rank)
            return f"between calls, with {queued} sent to it" if queued else "idle (between calls)"
        doing = f"running {beat['name']}"
        if isinstance(beat.get("seconds"), (int, float)):
            doing += f" for {beat['seconds']:.1f}s"
        waits = [str(w) for w in beat.get("waiting") or []][:3]
        return doing + (f", {'; '.join(waits)}" if waits else ", in its own code (no communication pending)")

    def _die(self, died: WorkerLost):
        self._failure = died
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        self._terminate()
        for future in pending:
            future._fail(died)

    # ---- calls -------------------------------------------------------------------------------------
    def _call(self, kind, target, args, kwargs, ranks, actor=None, method=None, name=None) -> CallFuture:
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

    def submit(self, fn, *args, ranks=None, **kwargs) -> CallFuture:
        """Start `fn(comm, *args, **kwargs)` on every rank (or `ranks`); returns a CallFuture."""
        return self._call("run", reference(fn), args, kwargs, ranks, name=getattr(fn, "__qualname__", "fn"))

    def run(self, fn, *args, ranks=None, timeout: float | None = None, **kwargs) -> list:
        """Run `fn(comm, *args, **kwargs)` on every rank (SPMD); returns the results ordered by rank."""
        return self.submit(fn, *args, ranks=ranks, **kwargs).result(timeout)

    def spawn(self, cls, *args, ranks=None, **kwargs) -> ActorGroup:
        """Create `cls(comm, *args, **kwargs)` on every rank (or `ranks`); returns its handle."""
        actor_id = next(self._ids)
        name = getattr(cls, "__qualname__", "actor")
        self._call("spawn", reference(cls), args, kwargs, ranks, actor=actor_id, name=f"{name}()").result()
        ranks = list(range(self.world_size)) if ranks is None else sorted(set(ranks))
        return ActorGroup(self, actor_id, ranks, name)

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
        for rank, proc in enumerate(self.processes):
            if proc.poll() is None:
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
        Cluster._cleanup(self.processes, self.job_id, grace)

    @staticmethod
    def _cleanup(processes, job_id, grace: float = 0.0):
        deadline = time.monotonic() + grace
        for proc in processes:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in processes if p.poll() is None]
            for proc in alive:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            for proc in alive:
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
        for path in glob.glob(os.path.join(SHM_DIR, f"ringpipe-{job_id}-*")):
            try:
                os.unlink(path)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def failure(self) -> Exception | None:
        return self._failure


def _process_state(pid: int) -> str:
    """ " (process is stopped)" if /proc says so (a local, SIGSTOPped worker); else nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return " (its process is stopped, e.g. by SIGSTOP)" if state in ("T", "t") else ""


__all__ = ["Cluster", "RemoteError", "WorkerLost", "WorkerDied", "WorkerUnresponsive", "WorkerStuck",
           "ClusterStopped", "CallFuture", "ActorGroup", "arena_path"]

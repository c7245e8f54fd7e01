"""The driver side: start N worker processes, run SPMD functions and actors on them, watch them.

    with Cluster(world_size=4) as cluster:
        results = cluster.run(fn, x)          # fn(comm, x) on every rank, results ordered by rank
        trainers = cluster.spawn(Trainer, cfg)  # Trainer(comm, cfg) on every rank
        losses = trainers.train_step(0).result()

A worker that raises makes the call fail with `RemoteError` (rank + remote traceback) and aborts
the communication of the other ranks, so nobody hangs; the cluster stays usable. A worker that
dies (exit, signal) is noticed within a fraction of a second: the driver raises `WorkerDied` and
stops every other worker. `close()` leaves no process and no shared-memory file behind.
"""
from __future__ import annotations

import atexit
import glob
import itertools
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
from runtime.auth import JobKeys
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


class WorkerDied(RuntimeError):
    """A worker process ended while the cluster was running."""

    def __init__(self, rank: int, pid: int, returncode: int, remote_traceback: str, call: str | None):
        self.rank, self.pid, self.returncode = rank, pid, returncode
        how = (f"was killed by signal {signal.Signals(-returncode).name}" if returncode < 0
               else f"exited with code {returncode}")
        during = f" while running {call}" if call else ""
        tb = (f"\n--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}" if remote_traceback
              else " (no traceback: the process ended without raising)")
        super().__init__(f"worker rank {rank} (pid {pid}) {how}{during}; all workers stopped.{tb}")


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
                 **comm_options):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if algorithm not in ("auto", "direct", "ring", "shm"):
            raise ValueError(f"algorithm must be auto, direct, ring or shm, got {algorithm!r}")
        self.world_size = world_size
        self.job_id = secrets.token_hex(6)
        self.comm_config = CommConfig(timeout=timeout, shm=shm and shm_available(), algorithm=algorithm,
                                      **comm_options)
        self.threads_per_worker = threads_per_worker or max(1, (os.cpu_count() or 1) // world_size)
        self._closed = False
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
                    "start_timeout": start_timeout, "arena_bytes": arena_bytes}
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

    def _gather(self, kind: str, timeout: float) -> dict[int, dict]:
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            self._check_processes(starting=True)
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(got))
                raise TimeoutError(f"workers {missing} did not send '{kind}' within {timeout}s")
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
                if self._router in events:
                    self._receive_all()
                self._check_processes()
            except WorkerDied as died:
                self._die(died)
                return
            except zmq.ZMQError:
                if self._closed:
                    return
                raise

    def _receive_all(self):
        for _ in range(100):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            rank, value = self._parse(frames)
            if rank is not None:
                self._on_message(rank, value)

    def _post(self, rank, value):
        """Queue a message (or a callable to run) for the driver thread."""
        self._outbox.put((rank, value))
        self._wakeup.wake()

    def _on_message(self, rank, value):
        kind = value.get("t")
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
                self._fatal[rank] = value.get("traceback", "")
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

    def _die(self, died: WorkerDied):
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
            raise RuntimeError(f"cluster is stopped: {self._failure}".split("\n")[0])
        if self._closed:
            raise RuntimeError("cluster is closed")
        ranks = list(range(self.world_size)) if ranks is None else sorted(set(int(r) for r in ranks))
        if not ranks or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"ranks {ranks} must be a non-empty subset of 0..{self.world_size - 1}")
        message = {"t": "call", "id": next(self._ids), "kind": kind, "target": target, "args": list(args),
                   "kwargs": kwargs, "actor": actor, "method": method}
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

        self._post(0, ping_all)
        if not done.wait(60):
            raise TimeoutError("clock offsets: the driver thread did not answer")
        return result

    # ---- shutdown -----------------------------------------------------------------------------------
    def close(self):
        """Stop every worker (politely, then by force) and release every resource. Idempotent."""
        if self._closed:
            return
        self._closed = True
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)  # the router is this thread's alone from here on
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


__all__ = ["Cluster", "RemoteError", "WorkerDied", "CallFuture", "ActorGroup", "arena_path"]

"""A worker process: registers with the driver, connects to its peers, then runs what it is sent.

Started by the cluster's launcher (see runtime/launch.py) as `python -m ringpipe.runtime.worker` with a msgpack
bootstrap record on stdin (rank, addresses, the job's keys). The main thread executes calls (SPMD functions and
actor methods) one at a time; the engine thread owns every socket, so the control plane (aborts,
stop, heartbeats, stack requests) keeps working while user code computes.
"""
from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback

import msgpack

from ringpipe.runtime.trace import now_ns


def limit_blas_threads(threads: int):
    """Cap BLAS/OpenMP threads so N workers do not oversubscribe the machine's cores."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except Exception:  # noqa: BLE001 - threadpoolctl is best effort on exotic BLAS builds
        pass


def host_id() -> str:
    """Identifies this machine (hostname + boot id) so same-host peers can use shared memory."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}"


def resolve(reference: dict):
    """Find a module-level function or class by module and qualified name."""
    module_name, qualname = reference["module"], reference["qualname"]
    if module_name == "__main__":
        module = sys.modules.get("__mp_main__")
        if module is None:
            path = reference.get("main")
            if not path:
                raise ImportError("the driver's __main__ has no file; define functions in an importable module")
            from ringpipe.runtime import calls

            spec = importlib.util.spec_from_file_location("__mp_main__", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["__mp_main__"] = module
            calls.importing_main = path  # a Cluster started meanwhile is the script's unguarded entry point
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules["__mp_main__"]
                raise
            finally:
                calls.importing_main = None
    else:
        module = importlib.import_module(module_name)
    target = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


class Worker:
    def __init__(self, boot: dict):
        import zmq

        from ringpipe.runtime.addresses import dual_stack
        from ringpipe.runtime.auth import JobKeys
        from ringpipe.runtime.communicator import CommConfig, Communicator, Group
        from ringpipe.runtime.engine import Engine
        from ringpipe.runtime.shm import Arena, PeerArena, arena_path, same_host
        from ringpipe.runtime.shm_p2p import PairRings

        self.rank, self.world_size = boot["rank"], boot["world_size"]
        self.config = CommConfig(**boot["comm"])
        self.keys = JobKeys.from_dict(boot["keys"])
        self.context = dual_stack(zmq.Context())
        self.auth = self.keys.start_authenticator(self.context)
        self.engine = Engine(self.rank, self.context, self.keys, boot["bind_host"], self.config.timeout)
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.actors: dict = {}
        # The launcher names the host (a hostfile entry, a Slurm node): network namespaces on one
        # machine share its hostname and boot id, yet are separate hosts to the network.
        self.host = boot.get("host") or host_id()
        # The call the main thread is running: (driver's call id, name, monotonic start) or None.
        self.current: tuple | None = None
        self._later_abort: tuple | None = None  # (call id, reason): an abort of a call still queued
        self.main_thread = threading.get_ident()
        self.running_call = None  # the id of the call whose code runs now (what an interrupt may stop)
        self.interrupted_call = None  # the call the driver interrupted last
        self.log_to_file = bool(boot.get("log_path"))

        arena = None
        if self.config.shm:
            arena = Arena(arena_path(boot["job_id"], self.rank), boot["arena_bytes"])
            self.engine.arena = arena
            ring_bytes = PairRings.pin(arena, self.world_size)  # first, so every rank's rings sit at offset 0
            self.engine.rings = PairRings(self.engine, self.world_size, ring_bytes) if ring_bytes else None
        control = self.context.socket(zmq.DEALER)
        control.setsockopt(zmq.ROUTING_ID, b"w%d" % self.rank)
        control.setsockopt(zmq.LINGER, 2000)
        self.keys.make_client(control)
        control.connect(boot["driver"])
        self.control = control
        self._send({"t": "register", "rank": self.rank, "data": self.engine.address, "host": self.host,
                    "pid": os.getpid(), "arena": arena.path if arena else None})
        book = self._expect("book", boot["start_timeout"])["peers"]
        self.engine.connect_peers(book, self.host)
        if arena is not None:
            for entry in book:
                if entry["rank"] != self.rank and same_host(entry, self.host) and entry.get("arena"):
                    self.engine.peer_arenas[entry["rank"]] = PeerArena(entry["arena"], boot["arena_bytes"])
                    self.engine.shm_peers.add(entry["rank"])
            if self.engine.rings is not None:
                self.engine.rings.host_known(len(self.engine.shm_peers) + 1)
        self._send({"t": "ready"})
        self._expect("unlink", boot["start_timeout"])
        if arena is not None:
            arena.unlink()  # every peer has it mapped now; nothing remains in /dev/shm
        self._send({"t": "unlinked"})

        everyone_here = all(same_host(e, self.host) for e in book)
        world = Group("w", tuple(range(self.world_size)), self.rank,
                      bool(arena) and everyone_here and self.config.shm)
        self.world = Communicator(self.engine, world, self.config)
        self.engine.control = control
        self.engine.on_control = self._on_control
        self.engine.heartbeat = self._heartbeat
        self.engine.heartbeat_interval = float(boot.get("heartbeat_interval", 1.0))
        self.engine.start()

    # ---- control plane ---------------------------------------------------------------------------
    def _send(self, value):
        from ringpipe.runtime import wire

        self.control.send_multipart(wire.encode(value))

    def _expect(self, kind: str, timeout: float) -> dict:
        from ringpipe.runtime import wire

        if not self.control.poll(timeout * 1000):
            raise TimeoutError(f"rank {self.rank}: no '{kind}' from the driver within {timeout}s")
        value = wire.decode(self.control.recv_multipart())
        if value.get("t") != kind:
            raise RuntimeError(f"rank {self.rank}: expected '{kind}' from the driver, got {value.get('t')!r}")
        return value

    def _on_control(self, value):
        """Engine thread: route a driver message."""
        kind = value.get("t") if isinstance(value, dict) else None
        if kind == "call":
            self.calls.put(value)
        elif kind == "abort":
            call = value.get("call")
            self.engine.reset(int(value["epoch"]), str(value.get("reason", "aborted by the driver")),
                              call if isinstance(call, int) else None)
        elif kind == "stop":
            self.calls.put(None)
        elif kind == "interrupt":
            self.interrupted_call = value.get("call")
            if self.running_call is not None and self.running_call == self.interrupted_call:
                signal.pthread_kill(self.main_thread, signal.SIGINT)  # wakes a sleep; see on_interrupt
        elif kind == "clock":
            self.engine.send_control({"t": "clock", "time": now_ns()})
        elif kind == "trace":
            self.engine.tracer.start()
        elif kind == "stack":
            self.engine.send_control({"t": "stack", "text": self._main_stack()})
        else:
            logging.getLogger("ringpipe.runtime").error("rank %d: unknown control message %r", self.rank, kind)

    def _heartbeat(self) -> dict:
        """Engine thread: the liveness message, with the call in progress and what it waits for."""
        beat = {"t": "beat", "waiting": self.engine.describe_waits()}
        current = self.current
        if current is not None:
            beat.update(call=current[0], name=current[1], seconds=time.monotonic() - current[2])
        return beat

    def _main_stack(self) -> str:
        """Engine thread: where the compute (main) thread is now, as a formatted Python stack."""
        frame = sys._current_frames().get(self.main_thread)
        if frame is None:
            return "(the main thread has no Python frame)"
        frames = traceback.extract_stack(frame)
        # Start at the user's code: the frames of this module and of `python -m` say nothing.
        while len(frames) > 1 and (frames[0].filename == __file__ or frames[0].filename.startswith("<frozen")):
            frames.pop(0)
        return "".join(traceback.format_list(frames))

    def _reply(self, value):
        from ringpipe.runtime import wire

        # Operations this call started and left running are cancelled before the driver hears back.
        self.engine.end_call(value["id"], f"call {value['id']} ({self._call_name})")
        self.current = None  # the call is over: heartbeats say so from now on
        value["fence"] = self.engine.needs_fence
        value["waited_for"] = sorted(self.engine.timed_out_on)

        try:
            frames = wire.encode(value)
        except Exception as exc:  # noqa: BLE001 - unencodable or too large: the call must still fail
            frames = wire.encode({"t": "result", "id": value["id"], "ok": False, "type": type(exc).__name__,
                                  "error": f"{type(exc).__name__}: the result could not be sent: {exc}",
                                  "traceback": "", "aborted": False,
                                  "fence": value["fence"], "waited_for": value["waited_for"]})
        self.engine.call_soon(lambda: self.control.send_multipart(frames))

    def shutdown(self):
        """Flush what is queued for the driver, then close every socket."""
        self.engine.stop()
        self.auth.stop()
        self.context.destroy(linger=2000)

    # ---- calls ---------------------------------------------------------------------------------------
    def serve(self):
        from ringpipe.runtime.operations import Aborted

        while True:
            call = self.calls.get()
            if call is None:
                return 0
            self._take_abort(call["id"])
            self._call_name = (call.get("target") or {}).get("qualname") or call.get("method") or call["kind"]
            self.engine.timed_out_on.clear()
            self.current = (call["id"], str(call.get("name") or call["kind"]), time.monotonic())
            self.engine.begin_call(call["id"])
            failed, opened = True, self.engine.regions.opened
            try:
                self.running_call = call["id"]
                try:
                    self.on_interrupt()  # interrupted while still queued here: do not start it
                    value = self._execute(call)
                finally:
                    self.running_call = None
                failed = False
                self._reply({"t": "result", "id": call["id"], "ok": True, "value": value})
            except SystemExit as exc:
                self._reply({"t": "result", "id": call["id"], "ok": False, "type": "SystemExit",
                             "error": f"SystemExit({exc.code})", "traceback": traceback.format_exc(),
                             "aborted": False})
                return exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the driver
                if not isinstance(exc, Aborted):
                    self._log_failure(call, exc)
                self._reply({"t": "result", "id": call["id"], "ok": False, "type": type(exc).__name__,
                             "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                             "aborted": isinstance(exc, Aborted)})
            if failed or call["kind"] == "drop" or self.engine.regions.opened != opened:
                # What a failed call held often sits in reference cycles (a frame of the traceback
                # holding the error), and so may the groups a call or a dropped actor made (a group
                # references its channel, which calls back into it): free them now, on every member
                # alike, so their channels' arena regions go back at once, not at the next full
                # collection (the 32nd group of a test session's pooled cluster found no room).
                gc.collect()

    def on_interrupt(self, *signal_args):
        """Raise KeyboardInterrupt in the call's code if the driver interrupted the call running
        now (the SIGINT handler; a stray SIGINT, or one after the call ended, does nothing)."""
        if self.running_call is not None and self.running_call == self.interrupted_call:
            raise KeyboardInterrupt(f"rank {self.rank}: call {self._call_name} was interrupted in the driver")

    def _log_failure(self, call: dict, exc: BaseException):
        """With a log file (stdout goes there only): the traceback into the log, one line to stderr
        (the console shows it marked with this rank and host)."""
        if not self.log_to_file:
            return
        sys.stdout.write(traceback.format_exc())
        sys.stdout.flush()
        first = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        logging.getLogger("ringpipe.runtime").error("%s raised %s (the full trace is in this rank's log)",
                                                    call.get("name") or call["kind"], first)

    def _take_abort(self, call_id: int):
        """Before call `call_id` runs: earlier aborts are behind us, unless the abort is this call's
        own (it failed on another rank before this one took it off the queue). An abort naming a
        later call, one still queued behind this call, waits for that call: it must neither fail
        this call's communication nor be forgotten by the time that call starts."""
        engine = self.engine
        with engine.abort_lock:
            named = engine.aborted_call_id
            if named is not None and named > call_id and engine.aborted_call is not None:
                self._later_abort = (named, engine.aborted_call)
            if self._later_abort is not None and self._later_abort[0] <= call_id:
                if self._later_abort[0] == call_id:
                    engine.aborted_call_id, engine.aborted_call = self._later_abort
                self._later_abort = None
            if engine.aborted_call_id != call_id:
                engine.aborted_call = None

    def _execute(self, call: dict):
        kind = call["kind"]
        args, kwargs = call.get("args") or [], call.get("kwargs") or {}
        if kind == "run":
            return resolve(call["target"])(self.world, *args, **kwargs)
        if kind == "spawn":
            self.actors[call["actor"]] = resolve(call["target"])(self.world, *args, **kwargs)
            return None
        if kind == "method":
            actor = self.actors.get(call["actor"])
            if actor is None:
                raise KeyError(f"no actor {call['actor']} on rank {self.rank}")
            return getattr(actor, call["method"])(*args, **kwargs)
        if kind == "trace_stop":
            return self.engine.tracer.stop(args[0])
        if kind == "drop":
            self.actors.pop(call["actor"], None)
            return None
        raise ValueError(f"unknown call kind {kind!r}")


def main():
    from ringpipe.runtime.auth import raise_descriptor_limit
    from ringpipe.runtime.launch import die_with_parent

    raise_descriptor_limit()  # before any socket: strangers' connections must not starve this process
    boot = msgpack.unpackb(sys.stdin.buffer.read(), raw=False)
    # Dies with its launcher (the driver, or an agent on another host), even if stopped (SIGSTOP)
    # or too busy to notice: no orphan keeps its memory after a job was killed or cancelled.
    die_with_parent(boot.get("launcher_pid"))
    sys.path[:] = boot["sys_path"]
    os.chdir(boot["cwd"])
    limit_blas_threads(boot["threads"])
    # A core of its own where the host's ranks fit (runtime/cpu_binding.py); before any thread starts,
    # so that every thread of the worker inherits it.
    from ringpipe.runtime import cpu_binding

    try:
        # The Cluster's option where it was given, else this host's RINGPIPE_CPU_BIND (a joined
        # host's own), else "auto".
        cpu_binding.bind(cpu_binding.mode_from(boot.get("cpu_bind")), *cpu_binding.local_position(boot))
    except ValueError as exc:  # a bad RINGPIPE_CPU_BIND on this host
        print(f"ringpipe worker rank {boot['rank']}: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    except OSError as exc:  # (an optimisation: the worker runs unbound)
        print(f"ringpipe worker rank {boot['rank']}: not bound to cores ({exc})", file=sys.stderr, flush=True)
    # The engine thread must get the GIL quickly when a message arrives while the main thread
    # computes; the default 5 ms switch interval would delay every collective by up to that much.
    sys.setswitchinterval(float(os.environ.get("RINGPIPE_SWITCH_INTERVAL", "0.0005")))
    # The integer tuning variables, read once here: a bad value stops the worker at its start with the
    # variable's name, not a group's channel halfway open (its region pinned, its peers waiting).
    from ringpipe.runtime import env_setting

    try:
        env_setting.check()
    except ValueError as exc:
        print(f"ringpipe worker rank {boot['rank']}: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    # With a log file, the launcher marks every stderr line with the rank and host already.
    prefix = "" if boot.get("log_path") else f"[ringpipe rank {boot['rank']}] "
    logging.basicConfig(level=logging.WARNING, format=f"{prefix}%(levelname)s %(message)s")
    worker = Worker(boot)
    signal.signal(signal.SIGINT, worker.on_interrupt)  # only the driver's interrupt of a call stops it
    code = worker.serve()
    worker.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()

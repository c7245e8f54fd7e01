"""The communication engine: one thread per worker owns every data-plane socket.

User threads submit operations (p2p sends/receives, collectives) and get a `Handle` back; the
engine runs each operation as a generator that yields what it waits for (a message, a ZeroMQ send
to complete, a free shared-memory block) and resumes it when that is there. Many operations are
in flight at once (several groups, p2p beside collectives), which is what lets compute overlap
communication, as NCCL streams do. Every operation has a deadline: waiting past it fails the
operation with an error naming the operation, group, rank and the peer it waited for.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import defaultdict, deque

import zmq

from runtime import wire
from runtime.trace import Tracer, now_ns
from runtime.wakeup import WakePipe

log = logging.getLogger("ringpipe.runtime")

# Payloads at least this large move without a copy into ZeroMQ (tracked) or through shared memory.
ZERO_COPY_BYTES = 64 << 10


class CommError(RuntimeError):
    """A communication operation failed (timeout, mismatch, abort)."""


class CommTimeout(CommError, TimeoutError):
    pass


class CollectiveMismatch(CommError):
    pass


class Aborted(CommError):
    pass


class Cancelled(CommError):
    """The operation was still running when the call that started it ended (its handle was never
    waited on there); it was stopped on every member, since a peer's next call must not match it."""


class Handle:
    """The result of an asynchronous operation: `wait()` returns it or raises its error."""

    __slots__ = ("_event", "_result", "_error", "name", "_transform")

    def __init__(self, name: str, transform=None):
        self._event = threading.Event()
        self._result = None
        self._error = None
        self._transform = transform
        self.name = name

    def is_done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None):
        if not self._event.wait(timeout):
            raise CommTimeout(f"{self.name}: not finished after waiting {timeout}s")
        if self._error is not None:
            raise self._error
        if self._transform is not None:
            self._result, self._transform = self._transform(self._result), None
        return self._result

    def _set(self, result=None, error=None):
        self._result, self._error = result, error
        self._event.set()


class Message:
    """One received data-plane message: inline arrays (read-only views of ZeroMQ frames) or
    references to blocks of the sender's shared-memory arena."""

    __slots__ = ("src", "meta", "inline", "shm")

    def __init__(self, src, meta, inline, shm):
        self.src, self.meta, self.inline, self.shm = src, meta, inline, shm


# What an operation's generator can yield.
class Recv:
    __slots__ = ("key", "peer")

    def __init__(self, key, peer):
        self.key, self.peer = key, peer


class WaitSent:
    __slots__ = ("tracker", "peer")

    def __init__(self, tracker, peer):
        self.tracker, self.peer = tracker, peer


class WaitBlock:
    __slots__ = ("nbytes",)

    def __init__(self, nbytes):
        self.nbytes = nbytes


class Operation:
    __slots__ = ("name", "generator", "handle", "deadline", "timeout", "waiting", "abort_key", "epoch", "call",
                 "trace", "start_ns", "blocked_ns", "wait_ns")

    def __init__(self, name, generator, handle, timeout, abort_key, epoch, call, trace):
        self.name, self.generator, self.handle = name, generator, handle
        self.timeout, self.deadline = timeout, time.monotonic() + timeout
        self.abort_key, self.epoch, self.call = abort_key, epoch, call
        self.waiting = None
        # Tracing: (span name, args) or None; wait_ns sums the time blocked on a peer's message.
        self.trace, self.start_ns, self.blocked_ns, self.wait_ns = trace, 0, 0, 0


class Engine:
    """Owns the data-plane sockets of one worker and runs its communication operations."""

    def __init__(self, rank: int, context: zmq.Context, keys, bind_host: str, timeout: float):
        self.rank = rank
        self.context = context
        self.keys = keys
        self.timeout = timeout
        self.router = context.socket(zmq.ROUTER)
        keys.make_server(self.router)
        self.router.setsockopt(zmq.RCVHWM, 0)
        port = self.router.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self.peers: dict[int, zmq.Socket] = {}
        self.send_lock = threading.Lock()
        self.identity_to_rank: dict[bytes, int] = {}
        self.arena = None
        self.peer_arenas: dict = {}
        self.same_host: set[int] = set()
        self.shm_peers: set[int] = set()  # same-host peers that mapped this rank's arena
        self.epoch = 0
        # The driver's id of the call this worker runs (or ran last). Every data message carries
        # the call it belongs to ("n") and is matched within that call only: what a call left
        # behind (a message nobody received, an operation nobody waited for) never meets the next.
        self.call = 0
        self._call_handles: list[Handle] = []  # handles submitted during the current call
        self.inbox: dict = defaultdict(deque)
        self.waiting: dict = defaultdict(deque)
        self.operations: set[Operation] = set()
        self.sent_waits: list = []
        self.block_waits: deque = deque()
        self.aborted: dict = {}
        self.control = None
        self.on_control = None
        self.rejected_messages = 0
        # Set when an operation failed: peers may be out of step, so the driver fences before the
        # next call (a new epoch drops stale messages and restarts collective numbering).
        self.needs_fence = False
        # After an abort, operations started before the current call ends fail at once too: a rank
        # that reaches a collective after the abort must not wait for peers that already gave up.
        self.aborted_call: str | None = None  # why communication of the current call fails
        self.aborted_call_id: int | None = None  # the driver's id of the call that failed, if named
        self.abort_lock = threading.Lock()  # the pair above changes together (engine and call threads)
        self.bytes_sent = defaultdict(int)  # group id -> payload bytes this rank sent
        self._submissions: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = WakePipe()
        self._stopping = False
        self._parent_pid = os.getppid()
        self._thread = None
        self.tracer = Tracer(rank)
        # Liveness: `heartbeat()` (set by the worker) builds a message this thread sends to the
        # driver every `heartbeat_interval` seconds, whatever the compute thread is doing; peers
        # whose messages this rank timed out waiting for go into `timed_out_on` (the worker reports
        # them so the driver can tell the stuck rank from the ranks that waited for it).
        self.heartbeat = None
        self.heartbeat_interval = 1.0
        self._next_beat = 0.0
        self.timed_out_on: set[int] = set()

    # ---- setup ---------------------------------------------------------------------------
    def connect_peers(self, address_book: list[dict], host_id: str):
        for entry in address_book:
            peer = entry["rank"]
            self.identity_to_rank[b"r%d" % peer] = peer
            if entry["host"] == host_id:
                self.same_host.add(peer)
            if peer == self.rank:
                continue
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"r%d" % self.rank)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            self.keys.make_client(sock)
            sock.connect(entry["data"])
            self.peers[peer] = sock

    def start(self):
        self._thread = threading.Thread(target=self._loop, name=f"ringpipe-engine-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop after everything submitted so far (replies included) has been handed to ZeroMQ."""
        def set_stopping():
            self._stopping = True

        self.call_soon(set_stopping)
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---- called from user threads ----------------------------------------------------------
    def submit(self, name: str, make_generator, abort_key=None, timeout=None, transform=None,
               trace=None, call=None) -> Handle:
        """Run `make_generator(epoch, call)` on the engine thread; returns its Handle.

        `call` is the call the operation belongs to (default: the current one); messages it sends
        carry it and it receives only messages of the same call. `trace` = (span name, args dict)
        to record the operation when tracing is on."""
        handle = Handle(name, transform)
        handles = self._call_handles
        if len(handles) >= 256:  # keep the list short: only unfinished handles matter at the end
            handles[:] = [h for h in handles if not h.is_done()]
        handles.append(handle)
        self._submissions.put((name, make_generator, handle, self.timeout if timeout is None else timeout,
                               abort_key, self.call if call is None else call,
                               trace if self.tracer.enabled else None))
        self._wake()
        return handle

    def begin_call(self, call_id: int):
        """Worker thread, before running call `call_id`: messages of earlier calls are stale from now."""
        self.call = call_id
        self._call_handles = []
        self.call_soon(lambda: self._drop_before(call_id))

    def end_call(self, call_id: int, what: str):
        """Worker thread, when call `call_id` has returned or raised: operations it started and did
        not wait for are cancelled on every member (their handles raise `Cancelled`). Waits for the
        engine thread only when there is such an operation."""
        handles, self._call_handles = self._call_handles, []
        if all(h.is_done() for h in handles):
            return
        done = threading.Event()

        def cancel():
            try:
                self._cancel_call(call_id, what)
            finally:
                done.set()

        self.call_soon(cancel)
        done.wait(10.0)

    def call_soon(self, fn):
        """Run `fn()` on the engine thread (used for control-plane sends)."""
        self._submissions.put(fn)
        self._wake()

    def _wake(self):
        self._wakeup.wake()

    # ---- used by operations (engine thread) -------------------------------------------------
    def send(self, dst: int, header: dict, arrays=(), group=None, track: bool = True):
        """Send header + inline arrays to `dst`. Large payloads go without a copy and the ZeroMQ
        tracker is returned (the arrays may be reused once it is done); with track=False ZeroMQ
        copies them. Safe from any thread except for dst == this rank (engine thread only)."""
        header["e"] = self.epoch
        frames = wire.encode([header, list(arrays)])
        nbytes = sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames[1:])
        if dst == self.rank:
            if group is not None:
                self.bytes_sent[group] += nbytes
            self._deliver_local(frames)
            return None
        zero_copy = track and nbytes >= ZERO_COPY_BYTES
        with self.send_lock:  # the sockets are shared with user threads sending point-to-point
            if group is not None:
                self.bytes_sent[group] += nbytes
            if zero_copy:
                return self.peers[dst].send_multipart(frames, copy=False, track=True)
            self.peers[dst].send_multipart(frames)
            return None

    def _deliver_local(self, frames):
        # Decoded from copies: the sender may reuse its arrays as soon as send() returns.
        self._dispatch(self.rank, wire.decode([bytes(frames[0])] + [bytes(f) for f in frames[1:]]))

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self):
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control, zmq.POLLIN)
        while not self._stopping:
            try:
                events = dict(poller.poll(self._poll_timeout_ms()))
                if self._wakeup.fileno() in events:
                    self._wakeup.drain()
                self._take_submissions()
                if self.router in events:
                    self._receive_data()
                if self.control is not None and self.control in events:
                    self._receive_control()
                self._check_sent()
                self._check_deadlines()
                self._beat()
                if os.getppid() != self._parent_pid:
                    log.error("rank %d: driver process went away; exiting", self.rank)
                    os._exit(70)
            except Exception:  # the engine must survive anything a message or an op does
                log.exception("rank %d: error in communication engine loop", self.rank)

    def _poll_timeout_ms(self) -> int:
        if self.sent_waits:
            return 1
        timeout = 100.0
        if self.operations:
            soonest = min(op.deadline for op in self.operations) - time.monotonic()
            timeout = min(timeout, max(soonest * 1000.0, 0.0))
        return int(timeout) + 1

    def _take_submissions(self):
        while True:
            try:
                item = self._submissions.get_nowait()
            except queue.Empty:
                return
            if callable(item):
                item()
                continue
            name, make_generator, handle, timeout, abort_key, call, trace = item
            try:
                generator = make_generator(self.epoch, call)
            except Exception as exc:
                handle._set(error=exc)
                continue
            if self.aborted_call is not None:
                handle._set(error=Aborted(self.aborted_call))
                continue
            op = Operation(name, generator, handle, timeout, abort_key, self.epoch, call, trace)
            if trace is not None:
                op.start_ns = now_ns()
                self.tracer.counter("comm ops in flight", len(self.operations) + 1, thread="comm")
            aborted = self.aborted.get((self.epoch, call, *abort_key[:2])) if abort_key else None
            if aborted is not None:
                handle._set(error=aborted[0](aborted[1]))
                continue
            self.operations.add(op)
            self._advance(op, None)

    def _advance(self, op: Operation, value, error=None):
        while True:
            try:
                request = op.generator.throw(error) if error is not None else op.generator.send(value)
            except StopIteration as stop:
                self._finish(op, result=stop.value)
                return
            except BaseException as exc:  # noqa: BLE001 - any failure belongs to the operation
                self._finish(op, error=exc)
                return
            error = None
            if isinstance(request, Recv):
                pending = self.inbox.get(request.key)
                if pending:
                    value = pending.popleft()
                    if not pending:
                        del self.inbox[request.key]
                    continue
                self.waiting[request.key].append(op)
            elif isinstance(request, WaitSent):
                if request.tracker is None or request.tracker.done:
                    value = None
                    continue
                self.sent_waits.append((request.tracker, op))
            elif isinstance(request, WaitBlock):
                offset = self.arena.alloc(request.nbytes)
                if offset is not None:
                    value = offset
                    continue
                self.block_waits.append((op, request.nbytes))
            else:
                error = TypeError(f"operation yielded {request!r}")
                continue
            op.waiting = request
            if op.trace is not None:
                op.blocked_ns = now_ns()
            return

    def _resume(self, op: Operation, value):
        """Continue a parked operation; time spent parked counts as waiting on a peer."""
        op.waiting = None
        if op.trace is not None:
            op.wait_ns += now_ns() - op.blocked_ns
        self._advance(op, value)

    def _finish(self, op: Operation, result=None, error=None):
        if error is not None:
            self.needs_fence = True
        self.operations.discard(op)
        self._forget_waits(op)
        if (isinstance(error, (CollectiveMismatch, Cancelled)) and op.abort_key is not None
                and (op.epoch, op.call, *op.abort_key[:2]) not in self.aborted):
            self._broadcast_abort(op, error)
        if op.trace is not None:
            name, args = op.trace
            args = dict(args, wait_us=op.wait_ns / 1000.0)
            if args.get("bytes") is None and hasattr(result, "nbytes"):
                args["bytes"] = int(result.nbytes)  # a receive learns its size on arrival
            if error is not None:
                args["error"] = type(error).__name__
            self.tracer.complete(name, "comm", "comm", op.start_ns, now_ns(), args)
        op.handle._set(result, error)

    def _forget_waits(self, op):
        request, op.waiting = op.waiting, None
        if isinstance(request, Recv):
            waiters = self.waiting.get(request.key)
            if waiters and op in waiters:
                waiters.remove(op)
                if not waiters:
                    del self.waiting[request.key]
        elif isinstance(request, WaitSent):
            self.sent_waits = [(t, o) for t, o in self.sent_waits if o is not op]
        elif isinstance(request, WaitBlock):
            self.block_waits = deque((o, n) for o, n in self.block_waits if o is not op)

    def _fail(self, op, error):
        self._forget_waits(op)
        try:
            op.generator.close()
        except Exception:  # noqa: BLE001
            pass
        self._finish(op, error=error)

    def _cancel(self, op, error):
        """Like _fail, but the error is raised inside the operation: a collective keeps the arena
        blocks it owns (a peer may still be reading them) until the fence that follows resets
        the arena, instead of giving them back at once."""
        self._forget_waits(op)
        try:
            op.generator.throw(error)
        except BaseException:  # noqa: BLE001 - the expected way out
            pass
        else:
            op.generator.close()
        self._finish(op, error=error)

    def _cancel_call(self, call_id: int, what: str):
        left = [op for op in self.operations if op.call <= call_id]
        for op in left:
            self._cancel(op, Cancelled(f"{op.name} was cancelled on rank {self.rank}: {what} ended before it "
                                       f"finished; wait() for asynchronous operations before a call returns"))
        if left:
            log.warning("rank %d: %s ended with %d operation(s) still running, cancelled: %s", self.rank, what,
                        len(left), "; ".join(op.name for op in left))

    def _drop_before(self, call_id: int):
        """Engine thread, at the start of a call: forget what earlier calls left behind."""
        self._cancel_call(call_id - 1, "an earlier call")
        for key in [k for k in self.inbox if k[1] < call_id]:
            for message in self.inbox.pop(key):
                self._free_unread(message)
        for key in [k for k in self.aborted if k[1] < call_id]:
            del self.aborted[key]

    def _free_unread(self, message):
        """A message dropped unread still gives the sender's arena blocks back."""
        if message.shm:
            for offset, _ in message.shm:
                self.send(message.src, {"k": "free", "o": offset})

    def _check_sent(self):
        if not self.sent_waits:
            return
        ready = [(t, o) for t, o in self.sent_waits if t.done]
        if ready:
            self.sent_waits = [(t, o) for t, o in self.sent_waits if not t.done]
            for _, op in ready:
                self._resume(op, None)

    def _beat(self):
        now = time.monotonic()
        if self.heartbeat is None or self.control is None or now < self._next_beat:
            return
        self._next_beat = now + self.heartbeat_interval
        try:  # never block here: a driver that stopped reading must not wedge this thread
            self.control.send_multipart(wire.encode(self.heartbeat()), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def describe_waits(self, limit: int = 4) -> list[str]:
        """What operations in flight wait for, longest first (engine thread), e.g.
        'all_reduce group w waiting 3.2s for a message from rank 2'."""
        now = time.monotonic()
        out = []
        for op in sorted(self.operations, key=lambda o: o.deadline - o.timeout)[:limit]:
            peer = getattr(op.waiting, "peer", None)
            what = {Recv: "a message from", WaitSent: "a send to"}.get(type(op.waiting), "")
            target = f"{what} rank {peer}" if peer is not None else "shared memory"
            out.append(f"{op.name} waiting {now - (op.deadline - op.timeout):.1f}s for {target}")
        return out

    def _check_deadlines(self):
        now = time.monotonic()
        for op in [op for op in self.operations if op.deadline <= now]:
            peer = getattr(op.waiting, "peer", None)
            if peer is not None:
                self.timed_out_on.add(peer)
            what = {Recv: "a message from", WaitSent: "a send to"}.get(type(op.waiting), "")
            detail = f"waiting for {what} rank {peer}" if peer is not None else "waiting for shared memory"
            self._fail(op, CommTimeout(f"{op.name} on rank {self.rank} timed out after "
                                       f"{op.timeout:g}s {detail}"))

    def release_block(self, offset: int):
        """Return a block of this worker's arena and hand free space to operations waiting."""
        self.arena.free(offset)
        self.grant_blocks()

    def grant_blocks(self):
        """Resume operations waiting for arena space, in order, while it lasts."""
        while self.block_waits:
            op, nbytes = self.block_waits[0]
            block = self.arena.alloc(nbytes)
            if block is None:
                return
            self.block_waits.popleft()
            self._resume(op, block)

    # ---- incoming data ----------------------------------------------------------------------
    def _receive_data(self):
        for _ in range(1000):  # bounded so submissions and deadlines are looked at regularly
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            src = self.identity_to_rank.get(frames[0].bytes)
            try:
                if src is None:
                    raise wire.WireError(f"unknown sender identity {frames[0].bytes[:16]!r}")
                self._dispatch(src, wire.decode([frames[1].bytes] + [f.buffer for f in frames[2:]]))
            except wire.WireError as exc:
                self._reject(src, exc)

    def _reject(self, src, reason):
        self.rejected_messages += 1
        log.error("rank %d: rejected a malformed message from %s: %s", self.rank,
                  f"rank {src}" if src is not None else "an unknown sender", reason)

    def _dispatch(self, src, value):
        """Validate a decoded message completely, then route it (stale epochs are dropped)."""
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], dict)
                and isinstance(value[1], list)):
            raise wire.WireError("message is not [header, arrays]")
        header, inline = value
        kind, epoch = header.get("k"), header.get("e")
        if not isinstance(epoch, int):
            raise wire.WireError("message has no epoch")
        if kind == "free":
            offset = header.get("o")
            if not isinstance(offset, int) or self.arena is None:
                raise wire.WireError("bad shared-memory free message")
            if epoch == self.epoch:
                self.release_block(offset)
            return
        if kind not in ("p2p", "coll", "abort"):
            raise wire.WireError(f"unknown message kind {kind!r}")
        group, channel, step, call = header.get("g"), header.get("c"), header.get("s", 0), header.get("n")
        if not (isinstance(group, str) and isinstance(channel, int) and isinstance(step, int)
                and isinstance(call, int)):
            raise wire.WireError("bad message key")
        shm = header.get("shm")
        if shm is not None:
            shm = self._validate_shm(src, shm)
        message = Message(src, header.get("m"), inline, shm)
        if epoch < self.epoch:
            return  # left over from an aborted call (the arena it points into was reset)
        if call < self.call:  # left over from an earlier call: nobody here will receive it
            self._free_unread(message)
            return
        if kind == "abort":
            self._on_abort(epoch, call, group, channel, str(header.get("r", "")), header.get("x") == "cancel")
            return
        key = (epoch, call, kind, group, channel, src, step)
        waiters = self.waiting.get(key)
        if waiters:
            op = waiters.popleft()
            if not waiters:
                del self.waiting[key]
            self._resume(op, message)
        else:
            self.inbox[key].append(message)

    def _validate_shm(self, src, refs):
        arena = self.peer_arenas.get(src)
        if arena is None or not isinstance(refs, list):
            raise wire.WireError(f"shared-memory reference from rank {src}, which has no mapped arena")
        out = []
        for ref in refs:
            if not (isinstance(ref, list) and len(ref) == 3 and isinstance(ref[0], int)):
                raise wire.WireError("bad shared-memory reference")
            offset, dtype_str, shape = ref
            _, dtype, shape = wire._array_spec(wire.msgpack.packb([0, dtype_str, shape]))
            nbytes = math.prod(shape) * dtype.itemsize
            try:
                view = arena.view(offset, nbytes)
            except ValueError as exc:
                raise wire.WireError(str(exc)) from None
            out.append((offset, view.view(dtype).reshape(shape)))
        return out

    # ---- aborts -------------------------------------------------------------------------------
    def _broadcast_abort(self, op, error):
        """Tell every member of the group that this collective cannot go on (a mismatch seen here,
        or this rank's call ended without waiting for it)."""
        group, seq, members = op.abort_key
        cancelled = isinstance(error, Cancelled)
        self.aborted[(op.epoch, op.call, group, seq)] = (Aborted if cancelled else CollectiveMismatch, str(error))
        header = {"k": "abort", "g": group, "c": seq, "n": op.call, "r": str(error)}
        if cancelled:
            header["x"] = "cancel"
        for peer in members:
            if peer != self.rank:
                self.send(peer, dict(header))

    def _on_abort(self, epoch, call, group, seq, reason, cancelled):
        kind = Aborted if cancelled else CollectiveMismatch
        self.aborted[(epoch, call, group, seq)] = (kind, reason)
        for op in list(self.operations):
            if (op.abort_key is not None and op.epoch == epoch and op.call == call
                    and op.abort_key[:2] == (group, seq)):
                # A cancelled peer may still be reading this rank's blocks: keep them until the fence.
                (self._cancel if cancelled else self._fail)(op, kind(reason))

    def reset(self, epoch: int, reason: str, call_id: int | None = None):
        """Fail every operation in flight and start a new epoch (after a failed call, `call_id`)."""
        self.epoch = epoch
        with self.abort_lock:
            self.aborted_call_id, self.aborted_call = call_id, reason
        for op in list(self.operations):
            self._fail(op, Aborted(reason))
        self.needs_fence = False
        self.inbox = defaultdict(deque, {k: v for k, v in self.inbox.items() if k[0] >= epoch})
        self.waiting.clear()
        self.sent_waits.clear()
        self.block_waits.clear()
        if self.arena is not None:
            self.arena.reset()

    # ---- control plane (owned here so the user's thread may be busy computing) ---------------
    def _receive_control(self):
        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                value = wire.decode([frames[0].bytes] + [f.buffer for f in frames[1:]])
            except wire.WireError as exc:
                self._reject("driver", exc)
                continue
            self.on_control(value)

    def send_control(self, value):
        frames = wire.encode(value)
        self.control.send_multipart(frames)

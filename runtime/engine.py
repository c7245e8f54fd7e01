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
import os
import queue
import threading
import time
from collections import defaultdict, deque

import zmq

from ringpipe.runtime.addresses import tcp_address
from ringpipe.runtime.arena_blocks import ArenaBookkeeping
from ringpipe.runtime.channel_regions import ChannelRegions
from ringpipe.runtime.messages import ZERO_COPY_BYTES, MessageDispatch
from ringpipe.runtime.operations import (Aborted, Cancelled, CollectiveMismatch, CommError, CommTimeout, Handle, Operation,
                                Recv, WaitBlock, WaitSent)
from ringpipe.runtime.trace import Tracer, now_ns
from ringpipe.runtime.wakeup import WakePipe

log = logging.getLogger("ringpipe.runtime")


class Engine(MessageDispatch, ArenaBookkeeping):
    """Owns the data-plane sockets of one worker and runs its communication operations: this file
    schedules operations (submit, advance, park, resume, cancel, deadlines); messages in and out
    are in runtime/messages.py, the shared-memory arena's blocks in runtime/arena_blocks.py."""

    def __init__(self, rank: int, context: zmq.Context, keys, bind_host: str, timeout: float):
        self.rank = rank
        self.context = context
        self.keys = keys
        self.timeout = timeout
        self.router = context.socket(zmq.ROUTER)
        keys.make_server(self.router)
        self.router.setsockopt(zmq.RCVHWM, 0)
        port = self.router.bind_to_random_port(tcp_address(bind_host))
        self.address = tcp_address(bind_host, port)
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
        # Same-host group channels (runtime/shm_channel.py), per group id (None: not usable), and their
        # regions; what one waits for in a calling thread, (operation, since, peer); who wakes on aborts.
        self.channels: dict = {}
        self.rings = None  # same-host point-to-point rings (runtime/shm_p2p.py), when the arena has room
        self.regions = ChannelRegions(self)
        self.direct_wait: tuple | None = None
        self.abort_listeners: list = []
        self.cancel_listeners: list = []  # f(call_id, what): a call ended with these operations running

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

    def count_sent(self, group: str, nbytes: int):
        """Count `nbytes` of payload as sent by this rank on `group` (from any thread)."""
        with self.send_lock:
            self.bytes_sent[group] += int(nbytes)

    def total_bytes_sent(self) -> int:
        """Payload bytes this rank has sent so far, over every group."""
        with self.send_lock:
            return sum(self.bytes_sent.values())

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
                if self.block_waits:  # room may come from ring blocks whose receivers read them
                    self.grant_blocks()
                self._check_deadlines()
                self._beat()
                if os.getppid() != self._parent_pid:
                    log.error("rank %d: driver process went away; exiting", self.rank)
                    os._exit(70)
            except Exception:  # the engine must survive anything a message or an op does
                log.exception("rank %d: error in communication engine loop", self.rank)

    def _poll_timeout_ms(self) -> int:
        if self.sent_waits or self.block_waits:
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
                if not self._park_receive(op, request):  # its sender closed the group: op failed
                    return
            elif isinstance(request, WaitSent):
                if request.tracker is None or request.tracker.done:
                    value = None
                    continue
                self.sent_waits.append((request.tracker, op))
            elif isinstance(request, WaitBlock):
                offset = self.alloc_block(request.nbytes)
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
        for cancel in list(self.cancel_listeners):
            cancel(call_id, what)
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

    def _check_sent(self):
        if not self.sent_waits:
            return
        ready = [(t, o) for t, o in self.sent_waits if t.done]
        if ready:
            self.sent_waits = [(t, o) for t, o in self.sent_waits if not t.done]
            for _, op in ready:
                self._resume(op, None)

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
        for wake in list(self.abort_listeners):
            wake()


# The errors and Handle live in runtime/operations.py; importable from here too, as before.
__all__ = ["Engine", "Handle", "CommError", "CommTimeout", "CollectiveMismatch", "Aborted", "Cancelled",
           "ZERO_COPY_BYTES"]

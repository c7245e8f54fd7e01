"""The engine's messages: connecting to peers, sending, receiving and routing data-plane messages
to the operations waiting for them, aborts between members, and the control plane to the driver
(its messages, heartbeats). Part of `Engine` (see engine.py), on its thread unless said otherwise.
"""
from __future__ import annotations

import logging
import time

import zmq

from ringpipe.runtime import wire
from ringpipe.runtime.group_state import on_made
from ringpipe.runtime.operations import Aborted, Cancelled, CollectiveMismatch, Message, Recv, WaitSent
from ringpipe.runtime.shm import same_host

log = logging.getLogger("ringpipe.runtime")

# Payloads at least this large move without a copy into ZeroMQ (tracked) or through shared memory.
ZERO_COPY_BYTES = 64 << 10


class MessageDispatch:
    """Mixed into `Engine`; uses its sockets, epoch, call, inbox/waiting queues and operations."""

    # ---- peers and sending ----------------------------------------------------------------------
    def connect_peers(self, address_book: list[dict], host_id: str):
        for entry in address_book:
            peer = entry["rank"]
            self.identity_to_rank[b"r%d" % peer] = peer
            if same_host(entry, host_id):
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
        if kind == "closed":  # a member closed a same-host group (runtime/channel_regions.py), in any epoch
            if not isinstance(header.get("g"), str):
                raise wire.WireError("bad group-closed message")
            self.regions.on_closed(src, header["g"])
            return
        if kind == "made":  # a rank made a group (runtime/group_state.py), in any epoch
            on_made(self, src, header)
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

    def _park_receive(self, op, request) -> bool:
        """Let `op` wait for the message `request` names; False (op failed) when its sender closed
        the group already: what it sent before its note is all that will come."""
        gid = request.key[3]
        if request.peer in self.regions.closed_by.get(gid, ()):
            self._fail(op, self.regions.gone(op.name, request.peer, gid))
            return False
        self.waiting[request.key].append(op)
        return True

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
        for wake in list(self.abort_listeners):  # a collective waiting in a calling thread looks again
            wake()

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
        direct = self.direct_wait  # a same-host channel waiting in the calling thread
        if direct is not None:
            out.append(f"{direct[0]} waiting {time.monotonic() - direct[1]:.1f}s for rank {direct[2]}")
        return out


__all__ = ["MessageDispatch", "ZERO_COPY_BYTES"]

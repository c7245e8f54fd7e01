"""Same-host group channels: the collectives of a group whose members share a host move their data
through shared memory and signal each other through counters there, from the calling thread, with
no ZeroMQ message and no hop through the engine thread (runtime/shm_collectives.py has the
algorithms; this file the region, the counters and the waiting).

Each member pins one region of its own arena per group (runtime/shm.py; it survives the arena's
reset after an abort, and goes back once the group is gone on every member: channel_regions.py)
and the members learn each other's offsets once, in one message round over the engine when the
group first uses its channel. A region holds:
- a 64-bit counter (`publish` raises it by one; waiters sleep on its low 32 bits with a futex) and
  a count of sleepers, so a publisher wakes only when someone sleeps (runtime/shm_wait.py);
- per buffer parity, the signature of the collective (operation, shape, dtype, reduction, root);
- the single-copy path's words (runtime/shm_cma.py: where each member's array lies, its probe);
- two data buffers of `buffer_bytes`, used alternately by consecutive rounds. A rank writes its
  buffer of round r only after every member reached round r-1, which each did only after it had
  read everything of round r-2: so nobody overwrites what a peer still reads, without any
  "done reading" signal.
Counters hold (abort epoch << 40) + count, so after an abort every member starts again from the new
epoch's zero, and a peer seen in a newer epoch means this operation was aborted.
"""
from __future__ import annotations

import threading
import time
import zlib

import msgpack
import numpy as np

from ringpipe.runtime import stream_choice
from ringpipe.runtime.channel_stream import ChannelStream
from ringpipe.runtime.operations import Aborted, CollectiveMismatch, CommTimeout, GroupDestroyedByPeer
from ringpipe.runtime.shm_wait import Spin, cores
from ringpipe.runtime.shm_wait import waiter as make_waiter
from ringpipe.runtime.trace import now_ns

HEADER_BYTES = 4096
SIGNATURE_AT, SIGNATURE_BYTES = 64, 1024  # per parity: id (length, crc32), position (call, #), msgpack bytes
EPOCH_SHIFT = 40
SLICE_S = 0.1  # longest sleep between looks at aborts and deadlines (an abort also wakes sleepers)
BUFFER_BYTES = 16 << 20  # one data buffer at most (buffer_bytes_for)


def buffer_bytes_for(arena_size: int, round_bytes: int) -> int:
    """Bytes of one data buffer: 16 MiB (larger buffers go in rounds), less in a small arena. Every
    round costs a wait for every member, and with more ranks than cores each wait may be a trip
    through the scheduler: few large rounds beat many small ones (4 ranks on 2 cores, 64 MiB
    all_reduce: 8 MiB buffers took ~10 % more CPU than 32 MiB ones). The pages are touched only as
    far as buffers fill them (the arena is a sparse file)."""
    return max(4096, min(BUFFER_BYTES, round_bytes, arena_size // 16) // 64 * 64)


def region_bytes(buffer_bytes: int) -> int:
    return HEADER_BYTES + 2 * buffer_bytes


class GroupChannel(ChannelStream):
    """One group's channel on one rank. `regions[i]` = (uint8 mapping of member i's arena, offset
    of its region there), in group order, or None while opening (connect()); `gone`: the members
    (global ranks) that closed the group, as their notes come (runtime/channel_regions.py).
    Operations run one at a time (a lock); asynchronous ones on its stream (channel_stream.py)."""

    def __init__(self, engine, group, regions, buffer_bytes: int, mode: str | None = None, gone=frozenset(),
                 opening=None):
        self.engine, self.group, self.gone = engine, group, gone
        self.n, self.me = len(group.ranks), group.index
        self.buffer_bytes = buffer_bytes
        self.waiter = make_waiter(mode)
        # regions None: still opening (an asynchronous collective began it and did not wait for
        # the peers): `opening()` finishes it, as connect() says.
        self.regions, self._opening, self.open_error = None, opening, None
        self.lock = threading.Lock()
        self.epoch, self.count, self.rounds = None, 0, 0
        # This job's ranks on this host: what streaming and the thread's priority go by (ranks of
        # other groups share the cores too).
        self.host_ranks = len(engine.shm_peers) + 1
        # Spin only while this job's ranks on the host have a core each; beyond that, yield the core
        # between looks (by the group's members instead, the README's main command: 13,862 -> 14,347
        # and 14,242 -> 14,365 tok/s, 200 steps, two pairs).
        self.spin = Spin(self.host_ranks > cores(), self.host_ranks)
        # Whether copies for peers stream, by this channel's own timings (runtime/stream_choice.py).
        self.stream_choice = stream_choice.new_state()
        self.name, self.deadline, self.timeout, self.wait_ns = "", 0.0, 0.0, 0
        self._sleeping_on = None
        if regions is not None:
            self.map(regions)
        self._views: dict = {}  # (member, parity, dtype, count) -> that buffer's view
        self._written = [None, None]
        self.start_stream()
        self.call = None  # the call of the operation running now
        self.small = None  # the one-call C rounds of small collectives (runtime/shm_small.attach)
        self.single_copy = None  # runtime/shm_cma.py's state once probed (False: the group cannot)
        engine.abort_listeners.append(self._wake_sleeper)
        engine.cancel_listeners.append(self._cancel_call)

    def private_bytes(self) -> int:
        """Bytes of this process's own memory the channel keeps (not its shared arena region): the
        small rounds' scratch and control words, the chunk loop's state, the single-copy scratch, the
        stream choice."""
        held = [getattr(self.small, "scratch", None), getattr(self.small, "ctl", None),
                getattr(self.small, "chunks", None), getattr(self.single_copy, "scratch", None), self.stream_choice,
                *(state for state, _ in getattr(self, "_chunk_states", ()))]  # (one per parity)
        return int(sum(array.nbytes for array in held if array is not None))

    def map(self, regions):
        """Use `regions` ((uint8 mapping, offset) per member, in group order): the channel is open."""
        size, buffer_bytes = region_bytes(self.buffer_bytes), self.buffer_bytes
        mapped = [mapping[offset : offset + size] for mapping, offset in regions]
        self.words = [int(region.ctypes.data) for region in mapped]
        self.sleepers = [word + 8 for word in self.words]
        self.buffers = [[region[HEADER_BYTES + p * buffer_bytes : HEADER_BYTES + (p + 1) * buffer_bytes]
                         for p in (0, 1)] for region in mapped]
        # Counters and signature ids as 64-bit words (plain loads and stores of Python ints; an
        # aligned 8-byte access is atomic): cheaper per look than ctypes or NumPy scalars.
        self.counters = [memoryview(region[:8]).cast("Q") for region in mapped]
        self._ids = [[memoryview(region[SIGNATURE_AT + p * SIGNATURE_BYTES :][:16]).cast("Q") for p in (0, 1)]
                     for region in mapped]
        self.regions = mapped  # (last: regions set means open, for threads that look)

    def connect(self) -> bool:
        """Finish an opening that an asynchronous collective began (it did not wait for the peers):
        True once open; False when some member had no room (the group keeps to the engine's
        algorithms); raises how the opening failed, every time. The first operation that runs
        here calls it, on whatever thread, after the operations queued before it."""
        with self.lock:  # (held only by operations, which run once it is open)
            if self.regions is None and self.open_error is None and self._opening is not None:
                try:
                    self._opening()  # maps the regions if every member had room; waits to its deadline
                except BaseException as exc:  # noqa: BLE001 - remembered: later operations raise it too
                    self.open_error = exc
                self._opening = None
        if self.open_error is not None:
            raise self.open_error
        return self.regions is not None

    def destroyed(self, name: str, peer: int):
        return GroupDestroyedByPeer(f"{name} on rank {self.engine.rank}: rank {peer} destroyed group "
                                    f"{self.group.gid} and will not take part")

    def run(self, name: str, signature: dict, body, timeout: float, trace_args: dict | None, abort_key: tuple,
            fallback=None):
        """Run `body(self)` as the collective `name`; returns its result. `abort_key` = (epoch,
        call, group, #) is where the engine notes that a member gave this collective up. Failures
        set the engine's fence flag (peers may be out of step) as the engine's own operations do.
        While the channel is opening, it first finishes that (connect()); where that finds no
        room, `fallback()` (the engine's algorithm, at the same number) runs instead."""
        # Bounded: an earlier operation still holding the channel (its peers gone) must not
        # hang this one past its own timeout.
        if self.regions is None and not self.connect():
            return fallback()
        if not self.lock.acquire(timeout=timeout):
            raise CommTimeout(f"{name} on rank {self.engine.rank} timed out after {timeout:g}s waiting for an "
                              f"earlier operation on group {self.group.gid} to finish")
        try:
            engine = self.engine
            if engine.aborted_call is not None:
                raise Aborted(engine.aborted_call)
            given_up = engine.aborted.get(abort_key)
            if given_up is not None:  # a member already gave this collective up (cancelled, mismatched)
                raise given_up[0](given_up[1])
            if self.epoch != engine.epoch:
                self.epoch, self.count, self.rounds = engine.epoch, 0, 0
            self.name, self.timeout = name, timeout
            self.deadline = time.monotonic() + timeout
            self.signature = msgpack.packb(signature)
            self.signature_id = (len(self.signature) << 32) | zlib.crc32(self.signature)
            # Where in the program every member should be: a member left out of step by an
            # earlier failure shows up here as a mismatch, never as a stale buffer read.
            self.abort_key, self.position = abort_key, (abort_key[1] << 32) | abort_key[3]
            self.call = abort_key[1]
            self.signature_dict = signature
            self.wait_ns = 0
            start = now_ns() if trace_args is not None else 0
            error = None
            try:
                return body(self)
            except BaseException as exc:
                error = type(exc)  # (not exc: its traceback holds this frame, which would hold it)
                engine.needs_fence = True
                raise
            finally:
                if trace_args is not None:
                    args = dict(trace_args, wait_us=self.wait_ns / 1000.0)
                    span = args.pop("op")
                    if error is not None:
                        args["error"] = error.__name__
                    engine.tracer.complete(span, "comm", "comm", start, now_ns(), args)
        finally:
            self.lock.release()

    def next_round(self) -> int:
        """The buffer parity of the next round (the same on every member)."""
        parity = self.rounds & 1
        self.rounds += 1
        return parity

    def buffer(self, member: int, parity: int, dtype, count: int) -> np.ndarray:
        """`count` elements of `dtype` at the start of member's buffer `parity` (the views of the
        shapes a program keeps using are made once)."""
        key = (member, parity, dtype, count)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= 1024:
                self._views.clear()
            view = self._views[key] = self.buffers[member][parity][: count * np.dtype(dtype).itemsize].view(dtype)
        return view

    def buffer_address(self, member: int, parity: int) -> int:
        """Where member's buffer `parity` starts in this process (for C kernels)."""
        return self.words[member] + HEADER_BYTES + parity * self.buffer_bytes

    def elements_per_round(self, itemsize: int) -> int:
        return max(1, self.buffer_bytes // max(itemsize, 1))

    # ---- signatures -----------------------------------------------------------------------------
    def write_signature(self, parity: int):
        """Put this collective's signature where peers check it: an id (length, crc32), then the
        msgpack bytes for the error message (written only when they change)."""
        if self._written[parity] != self.signature_id:
            self.write_signature_bytes(parity, self.signature, self.signature_id)
        ids = self._ids[self.me][parity]
        ids[0], ids[1] = self.signature_id, self.position

    def write_signature_bytes(self, parity: int, packed: bytes, signature_id: int):
        at = SIGNATURE_AT + parity * SIGNATURE_BYTES
        data = packed[: SIGNATURE_BYTES - 16]
        self.regions[self.me][at + 16 : at + 16 + len(data)] = np.frombuffer(data, np.uint8)
        self._written[parity] = signature_id

    def check_signatures(self, parity: int):
        """After every member published the round: raise CollectiveMismatch naming the first
        member whose signature differs from this rank's (every member checks every other, so all
        raise together)."""
        for peer in range(self.n):
            if peer == self.me:
                continue
            ids = self._ids[peer][parity]
            if ids[0] != self.signature_id:
                at = SIGNATURE_AT + parity * SIGNATURE_BYTES
                raise CollectiveMismatch(f"{self.name}: rank {self.me} called it with "
                                         f"{_describe(self.signature_dict)} but rank {peer} with "
                                         f"{_describe(self._peer_signature(peer, at))}")
            if ids[1] != self.position:
                theirs = int(ids[1])
                raise CollectiveMismatch(f"{self.name}: rank {peer} is at collective #{theirs & 0xFFFFFFFF} of call "
                                         f"{theirs >> 32} instead (out of step after an earlier failure)")

    def _peer_signature(self, peer: int, at: int):
        region = self.regions[peer]
        length = int(self._ids[peer][(at - SIGNATURE_AT) // SIGNATURE_BYTES][0]) >> 32
        try:
            return msgpack.unpackb(region[at + 16 : at + 16 + min(length, SIGNATURE_BYTES - 16)].tobytes())
        except Exception:  # noqa: BLE001 - truncated (huge shapes) or a different operation's
            return "a different signature"

    # ---- counters ------------------------------------------------------------------------------
    def publish(self):
        """This rank reached the next step: raise its counter and wake its sleepers."""
        self.count += 1
        self.waiter.publish(self.words[self.me], self.sleepers[self.me], (self.epoch << EPOCH_SHIFT) | self.count)

    def wait_all(self, behind: int = 0, inside: bool = False):
        """Until every member has published as often as this rank (in this epoch), less `behind`.
        `inside`: a wait past the collective's first, every member in it (see _wait)."""
        target = (self.epoch << EPOCH_SHIFT) | (self.count - behind)
        for peer in range(self.n):
            if peer != self.me:
                self._wait(peer, target, inside)

    def wait_for(self, peer: int):
        """Until group member `peer` has published as often as this rank (in this epoch)."""
        self._wait(peer, (self.epoch << EPOCH_SHIFT) | self.count)

    def _wait(self, peer: int, target: int, inside: bool = False):
        word, sleepers, waiter = self.words[peer], self.sleepers[peer], self.waiter
        value = self.counters[peer][0]
        if value >= target:  # already there: no call into the waiter
            return self._check_epoch(value, peer)
        # Adaptive spin (shm_wait.Spin), learnt from the waits for members to arrive in a
        # collective. `inside` one (a wait past its first) every member is moving chunks: it spins
        # the longest and teaches the spin nothing (csrc/shm_reduce_chunks.c's arrived says why).
        # Spinning counts as waiting on the peer in the trace, as sleeping does.
        started = now_ns()
        spin = self.spin
        value = waiter.wait_at_least(word, sleepers, target, 0.0, spin.inside_ns() if inside else spin.ns(),
                                     spin.yields)
        if value >= target:
            if not inside:
                spin.answered(True)
            self.wait_ns += now_ns() - started
            return self._check_epoch(value, peer)
        self.engine.direct_wait = (self.name, time.monotonic(), self.group.ranks[peer])
        self._sleeping_on = word
        try:
            while True:
                left = self.deadline - time.monotonic()
                value = waiter.wait_at_least(word, sleepers, target, max(0.0, min(SLICE_S, left)), 0, False)
                if value >= target:
                    if not inside:
                        spin.answered(False, now_ns() - started)
                    return self._check_epoch(value, peer)
                if self.engine.aborted_call is not None or self.engine.epoch != self.epoch:
                    raise Aborted(self.engine.aborted_call or f"{self.name}: aborted on rank {self.engine.rank}")
                if self.call <= self._cancelled_through:
                    raise self._cancelled(self.name)
                given_up = self.engine.aborted.get(self.abort_key)
                if given_up is not None:  # a member's call ended without it, or it saw a mismatch
                    raise given_up[0](given_up[1])
                if self.group.ranks[peer] in self.gone and self.counters[peer][0] < target:  # (published before?)
                    raise self.destroyed(self.name, self.group.ranks[peer])
                if time.monotonic() >= self.deadline:
                    self.engine.timed_out_on.add(self.group.ranks[peer])
                    raise CommTimeout(f"{self.name} on rank {self.engine.rank} timed out after {self.timeout:g}s "
                                      f"waiting for a message from rank {self.group.ranks[peer]}")
        finally:
            self._sleeping_on = None
            self.engine.direct_wait = None
            self.wait_ns += now_ns() - started

    def _check_epoch(self, value: int, peer: int):
        if value >> EPOCH_SHIFT != self.epoch:
            # The peer already started over after an abort this rank has not seen yet.
            raise Aborted(f"{self.name}: rank {peer} was aborted (it is at a later epoch)")

    def _wake_sleeper(self):
        """Engine thread, on an abort: wake this rank's compute thread if it sleeps on a peer."""
        word = self._sleeping_on or (self.small.sleeping_on() if self.small is not None else 0)
        if word:
            self.waiter.wake(word)


def _describe(signature) -> str:
    if not isinstance(signature, dict):
        return repr(signature) if not isinstance(signature, str) else signature
    return ", ".join(f"{k}={v}" for k, v in signature.items())


__all__ = ["GroupChannel", "buffer_bytes_for", "region_bytes", "BUFFER_BYTES"]

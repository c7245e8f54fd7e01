"""The latency path of a same-host group channel: a small all_reduce, reduce_scatter, all_gather,
broadcast or barrier that the caller waits for is one call into C (runtime/csrc/shm_small.c), the
copies in and out included (csrc/shm_small_call.c, a CPython extension taking the arrays through the
buffer protocol, built on first use).

An asynchronous all_reduce (a data-parallel bucket) runs the same round on the channel's thread
once its turn on the stream comes, numbered when it was called (`_run`'s `numbered`), instead of
the Python round's bookkeeping (runtime/communicator.py's `queued`).

The round is the channel's own (runtime/shm_channel.py: same buffers, counters, signatures and
epochs), so a member on this path and one on the Python path (another wait mode, a larger size,
an asynchronous call of another collective) still meet, check each other's signature and sum in
the same order. What
Python costs per operation is kept to the bookkeeping every operation needs: its number in the
group, the abort checks, the signature (cached per shape), the trace span.
Error messages are built only when there is an error.

Used where the "c" wait mode works (the compiled helper); elsewhere, and for dtypes or sizes the
helper does not take (complex, bool, float16 is reduced as float32 by the caller, > SMALL_BYTES;
for all_reduce, larger than the one-round reduce, shm_collectives.one_round_bytes), the Python
path runs. Where the extension cannot be built (no Python headers), or for an array it
does not take (not C-contiguous, a read-only result), NumPy copies in and out around a ctypes call
run the same round (`RINGPIPE_SHM_SMALL_EXT=0` forces that, to compare or to test it).
"""
from __future__ import annotations

import os
import struct
import time
import zlib

import msgpack
import numpy as np

from ringpipe.runtime import c_library, shm_cma, shm_reduce_chunks, shm_small_waits, shm_wait, stream_store
from ringpipe.runtime.collectives import REDUCTIONS
from ringpipe.runtime.operations import Aborted
from ringpipe.runtime.shm_channel import EPOCH_SHIFT, HEADER_BYTES, SIGNATURE_AT, SIGNATURE_BYTES, SLICE_S
from ringpipe.runtime.reduce_kernels import C_DTYPES, C_OPS
from ringpipe.runtime.shm_collectives import SMALL_BYTES, chunk_elements, one_round_bytes
from ringpipe.runtime.trace import now_ns

SLICE_NS = int(SLICE_S * 1e9)  # the longest sleep in C between looks at aborts and the deadline
# The control block's words (csrc/shm_small.c's enum).
C_N, C_ME, C_PARITY, C_SPIN_NS = 0, 1, 2, 6
C_TIMEOUT_NS, C_PHASE, C_PEER, C_WAITED_NS, C_SLEEPING_ON, C_SCRATCH, C_OFFSET, C_SLEPT = 8, 13, 14, 15, 16, 17, 18, 19
C_KIND, C_STREAM_MIN, C_CHUNKS = 9, 20, 21
C_SLICE_NS, C_SPARE_CHECK_NS, C_SPARE_RECHECK_NS = 25, 26, 27  # read by csrc/shm_small_run.c
C_STREAM_REDUCE_MAX = 28
C_SPIN_IN_NS = 29  # KIND_HALVES: its waits past the first spin this long (csrc/shm_reduce_chunks.c's arrived)
C_ARRIVAL_NS = 30  # KIND_HALVES: the wait for the members to arrive, of C_WAITED_NS (C_SLEPT: whether it slept)
C_CHOICE = 31  # the channel's stream choice (runtime/stream_choice.py), its address
C_MEMBERS, C_PER_MEMBER = 32, 6
# C_PARITY .. C_PHASE in one pack: parity, target, signature, position, spin, yield, timeout, kind,
# dtype, op, count, phase.
_CALL = struct.Struct("<12q")
DONE, PENDING, LATER_EPOCH, MISMATCH = 0, 1, 2, 3
KIND_BARRIER, KIND_REDUCE, KIND_HALVES = 0, 1, 2
DTYPES = C_DTYPES
OPS = {name: C_OPS[REDUCTIONS[name]] for name in REDUCTIONS}  # by name: "avg" is a sum, divided after
# csrc/shm_small_call.c: its answer for arrays it does not take; where a result is copied from.
NOT_TAKEN, FROM_SCRATCH, FROM_EVERY_MEMBER = -1, -1, -2
# What _run did: the round did not run (the Python path must), the result is in `out`, the caller
# copies it from the buffers (the extension did not take the arrays).
NOT_RUN, FILLED, UNFILLED, NOT_HANDLED = 0, 1, 2, -3
MID_BYTES = 1 << 20  # all_gather (one member's piece), broadcast, reduce_scatter up to here (see __init__)
MODULE, SOURCES = "_ringpipe_shm_small", ("shm_small_call.c", "shm_small_run.c", "shm_small.c", "shm_wait.c",
                                          "reduce_sum.c", "shm_reduce_chunks.c", "stream_choice.c")
_extension: list = []  # [module or None], built once per process


def extension():
    """The compiled extension (csrc/shm_small_call.c), or None where it cannot be built or
    `RINGPIPE_SHM_SMALL_EXT` is "0"."""
    if os.environ.get("RINGPIPE_SHM_SMALL_EXT", "1") == "0":
        return None
    if not _extension:
        try:
            _extension.append(c_library.extension(MODULE, "shm_small_call", SOURCES))
        except Exception:  # noqa: BLE001 - no compiler, no headers: NumPy copies around the ctypes call
            _extension.append(None)
    return _extension[0]


class SmallRounds:
    """One channel's latency path. `lib`: the compiled helper (shm_wait.CWaiter's library)."""

    def __init__(self, channel, lib):
        self.channel, self.lib = channel, lib
        n = channel.n
        self.max_bytes = min(SMALL_BYTES, channel.buffer_bytes)
        # An all_reduce up to here is one round on the Python path too (shm_collectives.all_reduce).
        self.reduce_bytes = min(one_round_bytes(n), channel.buffer_bytes)
        # Other collectives up to here are one round there too while they fit one buffer (and are
        # not single-copy); a reduce_scatter's result (1/n of it) fits the scratch.
        self.mid_bytes = min(MID_BYTES, channel.buffer_bytes)
        self.ctl = np.zeros(C_MEMBERS + C_PER_MEMBER * n, np.int64)
        self.words = memoryview(self.ctl)
        self.address = int(self.ctl.ctypes.data)
        self.scratch = np.empty(max(self.max_bytes, self.reduce_bytes, self.mid_bytes) // 8 + 1, np.uint64)
        self.ctl[C_N], self.ctl[C_ME], self.ctl[C_SCRATCH] = n, channel.me, int(self.scratch.ctypes.data)
        self.ctl[C_STREAM_MIN] = stream_store.stream_min_bytes(channel.host_ranks)  # (the extension's copy in)
        self.ctl[C_STREAM_REDUCE_MAX] = stream_store.reduce_max_bytes()  # (its reduce-scatter round)
        choice = getattr(channel, "stream_choice", None)  # (the channel keeps it; None: the size rule)
        self.ctl[C_CHOICE] = 0 if choice is None else choice.ctypes.data
        self.ctl[C_SLICE_NS], self.ctl[C_SPARE_CHECK_NS] = SLICE_NS, shm_wait.SPARE_CHECK_NS
        self.ctl[C_SPARE_RECHECK_NS] = shm_wait.SPARE_RECHECK_NS
        self.ctl[C_SPIN_IN_NS] = channel.spin.max_ns
        engine = channel.engine  # what csrc/shm_small_run.c reads of them, for the channel's life
        self.fixed = (channel, engine, channel.lock, channel.spin, engine.tracer, channel._written, channel.group.gid,
                      engine.send_lock, engine.bytes_sent, self.address, int(channel.spin.yields))
        # KIND_HALVES rounds run the chunk loop (runtime/shm_reduce_chunks.py) on this state.
        self.chunks = np.zeros(shm_reduce_chunks.R_MEMBERS + shm_reduce_chunks.R_PER_MEMBER * n, np.int64)
        self.ctl[C_CHUNKS] = int(self.chunks.ctypes.data)
        for member in range(n):
            base, at = channel.words[member], C_MEMBERS + C_PER_MEMBER * member
            self.ctl[at : at + C_PER_MEMBER] = [
                base, channel.sleepers[member],
                base + SIGNATURE_AT, base + SIGNATURE_AT + SIGNATURE_BYTES,
                base + HEADER_BYTES, base + HEADER_BYTES + channel.buffer_bytes]
        self.yields = int(channel.spin.yields)
        self.ext = extension()
        self._views: dict = {}  # (dtype, shape, member) -> that member's buffers, parity 0 and 1, and the scratch
        self._signatures: dict = {}  # (op, shape, dtype, reduction or root) -> (dict, msgpack bytes, id)

    def sleeping_on(self) -> int:
        """The counter address the C call sleeps on now (0: none), for an abort's wake."""
        return int(self.words[C_SLEEPING_ON])

    # ---- operations: True when done here, False when the caller must take the Python path -------------
    def all_reduce(self, comm, x: np.ndarray, op: str, timeout, numbered=None) -> bool:
        """`numbered`: an asynchronous all_reduce's key (epoch, call, group, #), taken when it was
        called, now that its turn on the channel's stream came (see _run)."""
        dtype, channel = x.dtype, self.channel
        code, op_code = DTYPES.get(dtype), OPS.get(op)
        if code is None or op_code is None or (op == "avg" and code > 1):
            return False
        signature = self._signatures.get(("all_reduce", x.shape, dtype, op)) or self._signature(
            ("all_reduce", x.shape, dtype, op), {"op": "all_reduce", "shape": list(x.shape), "dtype": dtype.str,
                                                 "reduce": op})
        # (the sizes looked up again: as the Python path does, which a test may change)
        if x.nbytes > min(self.reduce_bytes, one_round_bytes(channel.n)) or (
                x.nbytes > self.max_bytes and shm_cma.chosen(channel, "all_reduce", x.nbytes)):
            # Larger than the one-round reduce: the Python path's reduce-scatter + all-gather round
            # (shm_collectives._reduce_round, in chunks) where that is one round, in place. A layout
            # the call cannot take goes there: the same round, so the choice may differ between members.
            n = channel.n
            if (self.ext is None or not x.flags.c_contiguous or not x.flags.writeable or not shm_reduce_chunks.runs_in_c(channel)
                    or x.size > channel.elements_per_round(x.itemsize) or shm_cma.chosen(channel, "all_reduce", x.nbytes)):
                return False
            return self._run(comm, "all_reduce", signature, KIND_HALVES, code, op_code, x, None, n if op == "avg" else 0,
                             x.nbytes, timeout, 2 * (n - 1) * (x.nbytes // n), None,
                             chunk_elements(channel, x.itemsize), numbered) != NOT_RUN
        # No test of x's layout or writability: those are this rank's own, and a path chosen on them
        # could reduce differently (signed zeros) from a peer's. The round copies x into its
        # contiguous buffer and back (a read-only x then raises as on the Python path).
        done = self._run(comm, "all_reduce", signature, KIND_REDUCE, code, op_code, x, x, FROM_SCRATCH, x.nbytes,
                         timeout, (channel.n - 1) * x.nbytes, None, 0, numbered)
        if done == NOT_RUN:
            return False
        if done == UNFILLED:
            x[...] = self._own_views(x)[2]
        if op == "avg":
            np.divide(x, channel.n, out=x)
        return True

    def broadcast(self, comm, x: np.ndarray, root: int, timeout) -> bool:
        if x.dtype.hasobject or self._too_large("broadcast", x.nbytes):  # (layout, writability: as all_reduce)
            return False
        dtype = x.dtype
        signature = self._signatures.get(("broadcast", x.shape, dtype, root)) or self._signature(
            ("broadcast", x.shape, dtype, root), {"op": "broadcast", "shape": list(x.shape), "dtype": dtype.str,
                                                  "root": root})
        if self.channel.me == root:  # its payload goes in its own buffer; the others copy it out
            return self._run(comm, "broadcast", signature, KIND_BARRIER, 0, 0, x, None, root, x.nbytes, timeout,
                             (self.channel.n - 1) * x.nbytes) != NOT_RUN
        done = self._run(comm, "broadcast", signature, KIND_BARRIER, 0, 0, None, x, root, x.nbytes, timeout)
        if done == UNFILLED:
            views = self._views.get((dtype, x.shape, root)) or self._make_views(dtype, x.shape, root)
            x[...] = views[(self.channel.rounds - 1) & 1]  # the parity of the round just run
        return done != NOT_RUN

    def all_gather(self, comm, x: np.ndarray, timeout):
        """Every member's `x` stacked along axis 0 (0-d ones as (1,)), as Communicator.all_gather
        returns it; None when the Python path must take it."""
        dtype, shape, n = x.dtype, x.shape, self.channel.n
        if dtype.hasobject or self._too_large("all_gather", x.nbytes):
            return None
        piece_shape = shape if shape else (1,)  # as the Python path's np.ascontiguousarray makes it
        signature = self._signatures.get(("all_gather", shape, dtype, None)) or self._signature(
            ("all_gather", shape, dtype, None), {"op": "all_gather", "shape": list(piece_shape), "dtype": dtype.str})
        out = np.empty((n, *piece_shape), dtype)
        done = self._run(comm, "all_gather", signature, KIND_BARRIER, 0, 0, x, out, FROM_EVERY_MEMBER, n * x.nbytes,
                         timeout, (n - 1) * x.nbytes)
        if done == NOT_RUN:
            return None
        parity = (self.channel.rounds - 1) & 1
        for member in range(n if done == UNFILLED else 0):
            views = self._own_views(x) if member == self.channel.me else (self._views.get((dtype, shape, member))
                                                                         or self._make_views(dtype, shape, member))
            out[member] = views[parity].reshape(piece_shape)
        return out.reshape(n * piece_shape[0], *piece_shape[1:])

    def reduce_scatter(self, comm, x: np.ndarray, op: str, timeout):
        """This rank's row block of the reduction (as Communicator.reduce_scatter returns it, x
        already checked there); None when the Python path must take it."""
        dtype, shape, n = x.dtype, x.shape, self.channel.n
        code, op_code = DTYPES.get(dtype), OPS.get(op)
        if code is None or op_code is None or (op == "avg" and code > 1):
            return None
        if self._too_large("reduce_scatter", x.nbytes):
            return None
        signature = self._signatures.get(("reduce_scatter", shape, dtype, op)) or self._signature(
            ("reduce_scatter", shape, dtype, op), {"op": "reduce_scatter", "shape": list(shape), "dtype": dtype.str,
                                                   "reduce": op})
        count = x.size // n
        result = np.empty(count, dtype)
        done = self._run(comm, "reduce_scatter", signature, KIND_REDUCE, code, op_code, x, result, FROM_SCRATCH,
                         x.nbytes, timeout, (n - 1) * count * x.itemsize, count, self.channel.me * count * x.itemsize)
        if done == NOT_RUN:
            return None
        if done == UNFILLED:
            result[...] = self.scratch.view(np.uint8)[: count * x.itemsize].view(dtype)
        if op == "avg":
            result /= n
        return result.reshape(shape[0] // n, *shape[1:])

    def barrier(self, comm, timeout) -> bool:
        signature = self._signatures.get("barrier") or self._signature("barrier", {"op": "barrier"})
        return self._run(comm, "barrier", signature, KIND_BARRIER, 0, 0, None, None, 0, 0, timeout) != NOT_RUN

    # ---- one round ------------------------------------------------------------------------------------
    def _run(self, comm, name, signature, kind, dtype_code, op_code, x, out, source, nbytes, timeout, sent=0,
             count=None, offset=0, numbered=None) -> int:
        """The round of collective `name` (`nbytes`: its size, for the trace) with `x` as this rank's
        payload (None: none; copied into its buffer of the round's parity) and the result copied
        into `out` (None: none) from `source` (FROM_SCRATCH, FROM_EVERY_MEMBER or a member's
        buffer); `sent`: payload bytes that count as sent by this rank (what its peers read); a
        reduction takes `count` elements (default all of x) from byte `offset` of every buffer
        (KIND_HALVES: x is reduced in place, `source` is the divisor, `offset` a chunk's elements).
        NOT_RUN when the channel is busy (asynchronous operations queued, or another thread in
        it), FILLED, or UNFILLED (the caller copies the result from the buffers).
        `numbered` (epoch, call, group, #): an asynchronous collective's key, on the channel's thread
        when its turn came; it runs whatever is queued behind it, and NOT_RUN (the channel's own run
        takes it) where the engine's epoch moved since or another thread holds the channel."""
        if self.ext is not None and numbered is None:  # the common case in one call (csrc/shm_small_run.c)
            done = self.ext.run(self, comm, name, signature, kind, dtype_code, op_code, x, out, source, nbytes, timeout,
                                sent, count, offset)
            if done != NOT_HANDLED:
                return done
        channel, engine = self.channel, self.channel.engine
        if numbered is None and (channel._queue or channel._running is not None):  # (as busy())
            return NOT_RUN
        if not channel.lock.acquire(False):
            return NOT_RUN
        if numbered is not None and numbered[0] != engine.epoch:  # (looked at under the lock, as the C path does)
            channel.lock.release()
            return NOT_RUN
        try:
            if numbered is None:
                epoch, call = engine.epoch, engine.call
                seq = comm._sequence.next((epoch, call))
            else:
                epoch, call, _, seq = numbered
            tracing = engine.tracer.enabled
            if tracing:
                start = now_ns()
                self.words[C_WAITED_NS] = 0  # (an error before the round shows no wait)
            error = None
            try:
                # What runs before every small collective is kept to what it needs: the abort key and
                # the deadline are made only where they are used (a given-up collective, a sleep).
                if engine.aborted_call is not None:
                    raise Aborted(engine.aborted_call)
                if engine.aborted:
                    given_up = engine.aborted.get((epoch, call, channel.group.gid, seq))
                    if given_up is not None:  # a member already gave this collective up
                        raise given_up[0](given_up[1])
                if channel.epoch != epoch:
                    channel.epoch, channel.count, channel.rounds = epoch, 0, 0
                patience = comm.config.timeout if timeout is None else timeout
                parity = channel.rounds & 1
                channel.rounds += 1
                channel.count += 1
                described, packed, signature_id = signature
                if channel._written[parity] != signature_id:
                    channel.write_signature_bytes(parity, packed, signature_id)
                position = (call << 32) | seq
                spin = channel.spin
                target, spin_ns = (epoch << EPOCH_SHIFT) | channel.count, spin.ns()
                slice_ns = SLICE_NS if patience >= SLICE_S else int(patience * 1e9)
                if count is None:
                    count = 0 if x is None else x.size
                # One call for the round unless it waits longer than a slice (then looks at aborts and
                # deadlines between slices): its spin, then sleeps on each member not there yet.
                if kind == KIND_HALVES:  # (`source` is the divisor, `offset` a chunk's elements; x reduced in place)
                    status = self.ext.halves(self.address, x, parity, target, signature_id, position, spin_ns,
                                             self.yields, slice_ns, dtype_code, op_code, count, source, offset)
                else:
                    status = NOT_TAKEN if self.ext is None else self.ext.round(
                        self.address, x, out, source, parity, target, signature_id, position, spin_ns, self.yields,
                        slice_ns, kind, dtype_code, op_code, count, offset)
                return self._after_round(comm, name, seq, status, parity, target, signature, position, spin_ns,
                                         slice_ns, patience, kind, dtype_code, op_code, x, out, source, count, offset,
                                         sent, epoch, call)
            except BaseException as exc:
                error = type(exc)  # (not exc: its traceback holds this frame, which would hold it)
                engine.needs_fence = True
                raise
            finally:
                if tracing:
                    gid = channel.group.gid
                    args = {"bytes": int(nbytes), "group": gid, "seq": seq,
                            "ranks": list(channel.group.ranks), "flow": f"{gid}#{seq}@{epoch}.{call}",
                            "wait_us": self.words[C_WAITED_NS] / 1000.0}
                    if error is not None:
                        args["error"] = error.__name__
                    engine.tracer.complete(name, "comm", "comm", start, now_ns(), args)
        finally:
            channel.lock.release()

    def _after_round(self, comm, name, seq, status, parity, target, signature, position, spin_ns, slice_ns, patience,
                     kind, dtype_code, op_code, x, out, source, count, offset, sent, epoch, call) -> int:
        """The rest of _run (and of csrc/shm_small_run.c's run) once the round's call returned
        `status`, under the channel's lock: a round the extension did not take, a wait past the spin,
        the publishes, the spin, an error, the bytes sent."""
        channel, engine = self.channel, self.channel.engine
        described, _, signature_id = signature
        filled = status != NOT_TAKEN and out is not None
        if status == NOT_TAKEN and kind != KIND_HALVES:  # NumPy copies around the ctypes call
            if x is not None:
                self._own_views(x)[parity][...] = x
            _CALL.pack_into(self.words, C_PARITY * 8, parity, target, signature_id, position, spin_ns, self.yields,
                            slice_ns, kind, dtype_code, op_code, count, 0)
            self.words[C_OFFSET] = offset
            status = self.lib.rp_small_round(self.address)
        if status == PENDING:
            # The deadline counts from the round's start: the wait so far is in C_WAITED_NS.
            deadline = time.monotonic() - self.words[C_WAITED_NS] / 1e9 + patience
            status = shm_small_waits.sleep(self, comm, name, seq, (epoch, call, channel.group.gid, seq), deadline,
                                           patience)
            if status == DONE and filled:
                self.ext.take(self.address, out, source)
        if kind == KIND_HALVES:  # the publishes it made (two a chunk when done; a mismatch stops after one)
            channel.count = int(self.chunks[shm_reduce_chunks.R_COUNT])
        slept, spin = self.words[C_SLEPT], channel.spin
        if slept or spin._ns < spin.max_ns:  # (a spin at its longest that answered stays so)
            # What the spin learns from is the wait for the members to arrive: past it they are in
            # the round, and its waits spin the longest (csrc/shm_reduce_chunks.c's arrived).
            spin.answered(not slept, self.words[C_ARRIVAL_NS if kind == KIND_HALVES else C_WAITED_NS])
        if status != DONE:
            shm_small_waits.fail(self, comm, name, seq, status, parity, described, signature_id, position)
        # Payload counts as sent by the member whose buffer peers read (as the Python path).
        if sent:
            engine.count_sent(channel.group.gid, sent)
        return FILLED if filled else UNFILLED

    def _too_large(self, op: str, nbytes: int) -> bool:
        """Whether all_gather, broadcast or reduce_scatter `op` of `nbytes` (as shm_cma.chosen
        counts them) is not one round of the Python path (one buffer's worth, not single-copy)."""
        return nbytes > self.max_bytes and (nbytes > self.mid_bytes or shm_cma.chosen(self.channel, op, nbytes))

    def _own_views(self, x):
        return self._views.get((x.dtype, x.shape, -1)) or self._make_views(x.dtype, x.shape, -1)

    def _make_views(self, dtype, shape, member):
        """(buffer of parity 0, of parity 1, scratch) shaped like the payload, of this rank
        (member -1) or of `member`."""
        channel = self.channel
        count = int(np.prod(shape, dtype=np.int64))
        owner = channel.me if member < 0 else member
        views = tuple(channel.buffers[owner][parity][: count * dtype.itemsize].view(dtype).reshape(shape)
                      for parity in (0, 1)) + (self.scratch.view(np.uint8)[: count * dtype.itemsize].view(dtype)
                                               .reshape(shape),)
        if len(self._views) >= 256:
            self._views.clear()
        self._views[(dtype, shape, member)] = views
        return views

    def _signature(self, key, described: dict):
        packed = msgpack.packb(described)
        entry = (described, packed, (len(packed) << 32) | zlib.crc32(packed))
        if len(self._signatures) >= 256:
            self._signatures.clear()
        self._signatures[key] = entry
        return entry


def attach(channel):
    """Give `channel` (None: none) its latency path where the C helper works (wait mode "c") and
    `RINGPIPE_SHM_SMALL` is not "0" (which keeps every round in Python, e.g. to compare); returns it."""
    lib = getattr(channel, "waiter", None) and getattr(channel.waiter, "_lib", None)
    if lib is not None and os.environ.get("RINGPIPE_SHM_SMALL", "1") != "0":
        channel.small = SmallRounds(channel, lib)
    return channel


__all__ = ["SmallRounds", "attach", "DTYPES", "OPS"]

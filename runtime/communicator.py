"""Communicator: the user-facing handle on a group of ranks (point-to-point and collectives).

Ranks inside a communicator are group-local: `comm.rank` is this process's index in the group and
`dst`/`src` arguments are indices in the same group. Every operation has a synchronous form and an
asynchronous one (`isend`/`irecv`, `async_op=True`) returning a `Handle` with `wait()`/`is_done()`.
NumPy and CuPy arrays are accepted; CuPy arrays are staged through host memory and results stay on
the device.

Communication belongs to the call (`Cluster.run`, an actor method) that started it and is matched
only within that call: an operation still running when its call returns is cancelled on every
member (`wait()` on its handle raises `Cancelled`), and a message nobody received is dropped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ringpipe.runtime import array_module, collectives, shm_collectives, shm_small
from ringpipe.runtime.arguments import check_operation, check_timeout
from ringpipe.runtime.collective_context import CollectiveContext
from ringpipe.runtime.engine import Engine
from ringpipe.runtime.channel_regions import group_channel
from ringpipe.runtime.group_state import GroupState, announce_group, waited
from ringpipe.runtime.operations import Handle
from ringpipe.runtime.point_to_point import PointToPoint


@dataclass(frozen=True)
class CommConfig:
    """Knobs shared by every rank of a job (they must agree, since they pick the algorithm)."""

    timeout: float = 60.0
    shm: bool = True
    algorithm: str = "auto"  # auto | direct | ring | shm
    direct_max_bytes: int = 32 << 10
    chunk_bytes: int = 1 << 20
    round_bytes: int = 64 << 20  # shared-memory rounds: at most this, and at most a quarter of the arena


@dataclass(frozen=True)
class Group:
    gid: str
    ranks: tuple  # global ranks, in group order
    index: int  # this process's position in `ranks`
    shm: bool  # every member on this host, with shared memory usable


def working_dtype(dtype: np.dtype) -> np.dtype:
    # float16 sums overflow and lose precision quickly: reduce in float32, cast back at the end.
    return np.dtype(np.float32) if dtype == np.float16 else dtype


class Communicator(PointToPoint):
    """Implements `runtime.comm_interface.CommunicatorInterface` over the engine (ZeroMQ, shared memory)."""

    def __init__(self, engine: Engine, group: Group, config: CommConfig, _sequence=None):
        self.engine, self.group, self.config = engine, group, config
        # Shared by the communicators `using` makes: collectives are numbered per group in call
        # order, and the group is destroyed once (runtime/group_state.py).
        self._sequence = _sequence or GroupState(engine, group)
        self._subgroups = Counter()
        # Whether waited-for collectives may take the group's latency path (runtime/shm_small.py),
        # once its channel is open: decided once, since group and config are frozen.
        self._small_ok = group.shm and config.algorithm in ("auto", "shm")

    def using(self, **changes) -> "Communicator":
        """The same group with other knobs (e.g. `algorithm="ring"`); every rank must do the same."""
        from dataclasses import replace

        return Communicator(self.engine, self.group, replace(self.config, **changes), self._sequence)

    rank = property(lambda self: self.group.index)
    size = property(lambda self: len(self.group.ranks))
    ranks = property(lambda self: self.group.ranks)
    timeout = property(lambda self: self.config.timeout)

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this process has sent so far, over all its communicators (a running total)."""
        return self.engine.total_bytes_sent()

    @property
    def tracer(self):
        """This process's trace recorder: `with comm.tracer.span("forward", microbatch=0): ...`."""
        return self.engine.tracer

    def __repr__(self):
        return f"Communicator(group={self.group.gid!r}, rank={self.rank}, size={self.size})"

    # ---- groups --------------------------------------------------------------------------------
    def destroy(self):
        """Give the group back: its same-host channel's shared memory and thread, once the group is
        gone on every member (each should call this when done with it; dropping every communicator of
        the group does the same, when garbage collection gets to them). Afterwards this communicator
        and those `using` made raise GroupDestroyed. The world group cannot be destroyed."""
        if self.group.gid == "w":
            raise ValueError(f"destroy: rank {self.engine.rank} cannot destroy the world group")
        self._sequence.destroy(f"destroyed on rank {self.engine.rank}", self.engine.channels.get(self.group.gid))

    def new_group(self, ranks) -> "Communicator | None":
        """A communicator over `ranks` (indices in this communicator); None on ranks outside it.

        Every member must call it, with the same `ranks` (non-members may too; runtime/group_state.py)."""
        self._sequence.check_alive("new_group")
        ranks = [int(r) for r in ranks]
        if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < self.size for r in ranks):
            raise ValueError(f"new_group: ranks {ranks} must be distinct members of 0..{self.size - 1}")
        members = tuple(self.group.ranks[r] for r in ranks)
        occurrence = self._subgroups[members]
        self._subgroups[members] += 1
        if self.rank not in ranks:
            return None
        announce_group(self.engine, self.group, members)  # for a timeout to say if members disagree
        gid = f"{self.group.gid}/{','.join(map(str, members))}#{occurrence}"
        shm = self.group.shm or all(m in self.engine.shm_peers or m == self.engine.rank for m in members)
        shm = shm and self.config.shm and self.engine.arena is not None
        return Communicator(self.engine, Group(gid, members, ranks.index(self.rank), shm), self.config)

    # ---- collectives ------------------------------------------------------------------------------
    def _collective(self, name, signature, algorithm, finish, async_op, timeout, nbytes=0, direct=None,
                    queued=None):
        """Run a collective: `algorithm(ctx)` on the engine thread, or `direct(channel)` on the group's
        same-host channel (runtime/shm_channel.py; on its stream when asynchronous). `queued(small,
        key)`: the same on the channel's latency path (runtime/shm_small.py) once its turn on the
        stream came, its number `key` taken at the call; None where that path does not take it."""
        self._sequence.check_alive(name)
        if direct is not None and self.size > 1:
            channel = self._channel(name, timeout, async_op)
            if channel is not None:
                return self._run_direct(channel, name, signature, direct, finish, timeout, nbytes, async_op, algorithm,
                                        queued)
        if self.size == 1:
            # Nothing to exchange: run the algorithm here, without a round trip to the engine thread.
            ctx = CollectiveContext(self.engine, self.group, -1, self.engine.epoch, self.engine.call, name, signature,
                                    self.config)
            handle = Handle(name, finish)
            try:
                next(algorithm(ctx))
            except StopIteration as done:
                handle._set(done.value)
            else:
                raise RuntimeError(f"{name}: a one-rank collective tried to communicate")
            return handle if async_op else handle.wait()
        seq, call = self._sequence.next((self.engine.epoch, self.engine.call)), self.engine.call
        handle = self._on_engine(name, seq, call, signature, algorithm, finish, timeout, nbytes)
        return handle if async_op else waited(self, handle)

    def _on_engine(self, name, seq, call, signature, algorithm, finish, timeout, nbytes) -> Handle:
        full_name = f"{name} #{seq} on group {self.group.gid} (rank {self.rank} of {self.size})"

        def make(epoch, call):
            ctx = CollectiveContext(self.engine, self.group, seq, epoch, call, full_name, signature, self.config)
            return collectives.guarded(ctx, algorithm(ctx))

        trace = None
        if self.engine.tracer.enabled:
            trace = (name, {"bytes": int(nbytes), "group": self.group.gid, "seq": seq, "ranks": list(self.group.ranks),
                            "flow": f"{self.group.gid}#{seq}@{self.engine.epoch}.{call}"})
        return self.engine.submit(full_name, make, abort_key=(self.group.gid, seq, self.group.ranks),
                                  timeout=timeout, transform=finish, trace=trace, call=call)

    def _channel(self, name, timeout, async_op=False):
        """The group's same-host channel (opened at its first collective: channel_regions.py), or None."""
        if not (self.group.shm and self.config.algorithm in ("auto", "shm") and self.engine.arena is not None):
            return None
        channel = self.engine.channels.get(self.group.gid)  # (open: the common case, without a call)
        return channel if channel is not None and channel.regions is not None else group_channel(
            self.engine, self.group, self.config, self._collective, shm_small.attach, name, timeout, async_op)

    def _small(self, operation: str, *args) -> bool:
        """Run `operation` (waited for) on the group's latency path for small collectives
        (runtime/shm_small.py); False when that does not take it (no channel open yet, busy, too large)."""
        channel = self._small_ok and self.engine.channels.get(self.group.gid)
        small = channel.small if channel else None  # (read once: destroy() may turn it off meanwhile)
        return small is not None and getattr(small, operation)(self, *args)

    def _run_direct(self, channel, name, signature, direct, finish, timeout, nbytes, async_op, algorithm,
                    queued=None):
        seq = self._sequence.next((self.engine.epoch, self.engine.call))
        full_name = f"{name} #{seq} on group {self.group.gid} (rank {self.rank} of {self.size})"
        trace = None
        if self.engine.tracer.enabled:
            trace = {"op": name, "bytes": int(nbytes), "group": self.group.gid, "seq": seq, "ranks": list(self.group.ranks),
                     "flow": f"{self.group.gid}#{seq}@{self.engine.epoch}.{self.engine.call}"}
        key = (self.engine.epoch, self.engine.call, self.group.gid, seq)
        patience = self.timeout if timeout is None else timeout

        def run():  # (where a member had no room for the channel it was opening: the engine's way)
            small = channel.small if queued is not None else None  # (read once: destroy() may turn it off)
            if small is not None:
                result = queued(small, key)
                if result is not None:
                    return result
            return channel.run(full_name, signature, direct, patience, trace, key, lambda: self._on_engine(
                name, seq, key[1], signature, algorithm, None, timeout, nbytes).wait())

        if async_op or channel.busy():  # on the channel's thread, after the operations queued there
            handle = channel.submit(Handle(full_name, finish), run, key)
            return handle if async_op else handle.wait()
        result = run()
        return finish(result) if finish is not None else result

    def all_reduce(self, x, op: str = "sum", async_op: bool = False, timeout: float | None = None):
        """Reduce `x` over the group, in place (sum, avg, max, min); returns `x`."""
        check_operation("all_reduce", self.rank, x, True, op, timeout)
        if not async_op and type(x) is np.ndarray and self._small_ok:  # (_small, inlined: it is the hot path)
            small = getattr(self.engine.channels.get(self.group.gid), "small", None)  # (read once, as in _small)
            if small is not None and small.all_reduce(self, x, op, timeout):
                return x
        host = x if type(x) is np.ndarray else np.asarray(array_module.to_host(x))
        dtype = working_dtype(host.dtype)
        in_place = (isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable and x.dtype == dtype
                    and not array_module.is_device_array(x))
        work = x.reshape(-1) if in_place else host.astype(dtype, copy=True).reshape(-1)
        signature = {"op": "all_reduce", "shape": list(host.shape), "dtype": host.dtype.str, "reduce": op}

        def finish(result):
            if not in_place:
                _write_back(x, result.reshape(host.shape))
            return x

        def direct(channel):
            return shm_collectives.all_reduce(channel, work, collectives.REDUCTIONS[op], channel.n if op == "avg" else 0)

        def queued(small, key):
            # A bucket's average during backward: the latency path's round in C on the channel's
            # thread (as a waited-for one is) instead of the Python round's bookkeeping, which the
            # compute thread's use of the caches makes dear (~0.1 ms a collective on a 2-vCPU VM).
            return work if small.all_reduce(self, x, op, timeout, key) else None

        return self._collective("all_reduce", signature, lambda ctx: collectives.all_reduce(ctx, work, op),
                                finish, async_op, timeout, host.nbytes, direct,
                                queued if async_op and in_place and type(x) is np.ndarray else None)

    def all_gather(self, x, async_op: bool = False, timeout: float | None = None):
        """Concatenation along axis 0 of every rank's `x` (same shape everywhere); 0-d inputs stack."""
        check_operation("all_gather", self.rank, x, timeout=timeout)
        gathered = None if async_op or type(x) is not np.ndarray else self._small("all_gather", x, timeout)
        if isinstance(gathered, np.ndarray):
            return gathered
        host = np.ascontiguousarray(array_module.to_host(x))
        piece_shape = host.shape if host.ndim else (1,)
        out = np.empty((self.size, *piece_shape), host.dtype)
        piece = host.reshape(piece_shape)
        signature = {"op": "all_gather", "shape": list(host.shape), "dtype": host.dtype.str}

        def finish(result):
            gathered = result.reshape(self.size * piece_shape[0], *piece_shape[1:])
            return array_module.module_of(x).asarray(gathered) if array_module.is_device_array(x) else gathered

        return self._collective("all_gather", signature, lambda ctx: collectives.all_gather(ctx, piece, out),
                                finish, async_op, timeout, out.nbytes,
                                lambda channel: shm_collectives.all_gather(channel, piece, out))

    def reduce_scatter(self, x, op: str = "sum", async_op: bool = False, timeout: float | None = None):
        """This rank's 1/size slice (along axis 0) of the reduction of `x` over the group."""
        check_operation("reduce_scatter", self.rank, x, op=op, timeout=timeout)
        host = np.asarray(array_module.to_host(x))
        if host.ndim == 0 or host.shape[0] % self.size:
            raise ValueError(f"reduce_scatter: x.shape[0] must be divisible by the group size {self.size}, "
                             f"got shape {host.shape} on rank {self.rank}")
        rows = host.shape[0] // self.size
        small = None if async_op or type(x) is not np.ndarray else self._small("reduce_scatter", x, op, timeout)
        if isinstance(small, np.ndarray):
            return small
        # Read-only below (algorithms copy what they modify), so no copy when already contiguous.
        work = np.ascontiguousarray(host, dtype=working_dtype(host.dtype)).reshape(self.size, -1)
        signature = {"op": "reduce_scatter", "shape": list(host.shape), "dtype": host.dtype.str, "reduce": op}

        def finish(result):
            result = result.reshape(rows, *host.shape[1:]).astype(host.dtype, copy=False)
            return array_module.module_of(x).asarray(result) if array_module.is_device_array(x) else result

        def direct(channel):
            return shm_collectives.reduce_scatter(channel, work, collectives.REDUCTIONS[op],
                                                  channel.n if op == "avg" else 0)

        return self._collective("reduce_scatter", signature, lambda ctx: collectives.reduce_scatter(ctx, work, op),
                                finish, async_op, timeout, host.nbytes, direct)

    def broadcast(self, x, src: int = 0, async_op: bool = False, timeout: float | None = None):
        """Copy rank `src`'s `x` into every rank's `x`, in place; returns `x`."""
        self._peer(src, "broadcast")
        check_operation("broadcast", self.rank, x, True, timeout=timeout)
        if not async_op and type(x) is np.ndarray and self._small("broadcast", x, int(src), timeout):
            return x
        host = np.asarray(array_module.to_host(x))
        in_place = isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable
        work = x.reshape(-1) if in_place else host.copy().reshape(-1)
        signature = {"op": "broadcast", "shape": list(host.shape), "dtype": host.dtype.str, "root": int(src)}

        def finish(result):
            if not in_place:
                _write_back(x, result.reshape(host.shape))
            return x

        return self._collective("broadcast", signature, lambda ctx: collectives.broadcast(ctx, work, int(src)),
                                finish, async_op, timeout, host.nbytes,
                                lambda channel: shm_collectives.broadcast(channel, work, int(src)))

    def barrier(self, async_op: bool = False, timeout: float | None = None):
        check_timeout("barrier", self.rank, timeout)
        if not async_op and self._small("barrier", timeout):
            return None
        return self._collective("barrier", {"op": "barrier"}, collectives.barrier, None, async_op, timeout,
                                direct=shm_collectives.barrier)


def _write_back(x, result: np.ndarray):
    if array_module.is_device_array(x):
        x[...] = array_module.module_of(x).asarray(result.astype(x.dtype, copy=False))
    else:
        np.copyto(x, result, casting="unsafe")

"""Point-to-point operations of a Communicator (runtime/communicator.py): send / recv and their
asynchronous forms, between ranks of the communicator's group.

A peer on the same host is reached through the pair ring in the shared-memory arena
(runtime/shm_p2p.py), from the calling thread, the common case in one call into C
(runtime/shm_p2p_fast.py); others through the engine's ZeroMQ sockets (runtime/transfer.py).
A message is matched by (call, group, tag) and belongs to the call that sent it.
"""
from __future__ import annotations

import numpy as np

from ringpipe.runtime import array_module, shm_p2p_fast
from ringpipe.runtime.arguments import check_array, check_operation, check_timeout
from ringpipe.runtime.operations import Aborted, Finished, Handle
from ringpipe.runtime.shm_p2p_receive import RingReceive
from ringpipe.runtime.trace import now_ns
from ringpipe.runtime.transfer import receive, send_arrays, send_now


class PointToPoint:
    """What Communicator adds for point-to-point: it has `engine`, `group`, `config`, `rank`,
    `size`, `timeout` and `_sequence`."""

    def _peer(self, peer: int, what: str) -> int:
        self._sequence.check_alive(what)
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size:
            raise ValueError(f"{what}: peer {peer!r} is not a rank of group {self.group.gid} (size {self.size})")
        return self.group.ranks[int(peer)]

    def isend(self, x, dst: int, tag: int = 0, timeout: float | None = None) -> Handle:
        """Start sending array `x` to `dst`; do not modify `x` until the handle is done."""
        dst_global = self._peer(dst, "send")
        check_operation("send", self.rank, x, timeout=timeout)  # (bad arguments raise before anything starts)
        host = x if type(x) is np.ndarray else np.asarray(array_module.to_host(x))
        engine = self.engine
        call = engine.call
        name = f"send to rank {dst} tag {tag} on group {self.group.gid}"
        allow_shm = self.config.shm
        trace = None
        if engine.tracer.enabled:
            flow = engine.tracer.next_flow((self.group.gid, engine.rank, dst_global, int(tag), call))
            trace = ("send", {"bytes": host.nbytes, "peer": int(dst), "group": self.group.gid, "tag": int(tag),
                              "flow": flow})
        rings = engine.rings
        if allow_shm and rings is not None and rings.usable(dst_global):
            # A peer on this host: into the ring to it, from this thread (runtime/shm_p2p.py).
            key, patience = (call, self.group.gid, int(tag)), self.timeout if timeout is None else timeout
            return self._send_directly(name, trace, lambda: rings.send(dst_global, key, host, name, patience))
        header = {"k": "p2p", "g": self.group.gid, "c": int(tag), "s": 0, "n": call}
        if dst_global in engine.same_host and dst_global != engine.rank:
            # Send from this thread, sparing a hand-off to the engine thread (which may wait for
            # the GIL while this thread computes). Per destination the path is always the same,
            # so messages keep their order.
            return self._send_directly(name, trace, lambda: send_now(engine, dst_global, dict(header), [host],
                                                                      self.group.gid, allow_shm, track=False))

        def make(epoch, call):
            return send_arrays(engine, dst_global, dict(header), [host], self.group.gid, allow_shm)

        return engine.submit(name, make, timeout=timeout, trace=trace, call=call)

    def _send_directly(self, name, trace, move) -> Handle:
        """Run `move()` (the whole send) on this thread; a handle that is already done."""
        if self.engine.aborted_call is not None:
            return Finished(name, error=Aborted(self.engine.aborted_call))
        start = now_ns() if trace is not None else 0
        error = None
        try:
            move()
        except Exception as exc:  # noqa: BLE001 - the handle's error
            error = exc
        if trace is not None:
            self.engine.tracer.complete(trace[0], "comm", "comm", start, now_ns(), dict(trace[1], wait_us=0.0))
        return Finished(name, error=error)

    def send(self, x, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        self._sequence.check_alive("send")  # (before the fast path, which knows no group's life)
        check_array("send", self.rank, x)  # (before the fast path too: isend checks the rest)
        shm_p2p_fast.send(self, x, dst, tag) or self.isend(x, dst, tag, timeout).wait()  # fast: one call into C

    def irecv(self, src: int, tag: int = 0, out=None, timeout: float | None = None) -> Handle:
        """Start receiving an array from `src`; `wait()` returns it (written into `out` if given).

        `out` must have the message's shape and dtype (nothing is cast): otherwise `wait()` raises
        ValueError naming both, and the sender is not held up (its data was delivered)."""
        src_global = self._peer(src, "recv")
        out is None or check_array("recv", self.rank, out, "out", in_place=True)
        check_timeout("recv", self.rank, timeout)
        gid, engine = self.group.gid, self.engine
        host_out = out if out is None or type(out) is np.ndarray or not array_module.is_device_array(out) else None
        expect = None if out is None else (tuple(out.shape), np.dtype(out.dtype))
        call = engine.call
        name = f"recv from rank {src} tag {tag} on group {gid}"

        def finish(array):
            if out is not None and type(out) is not np.ndarray and array_module.is_device_array(out):
                out[...] = array_module.module_of(out).asarray(array)
                return out
            return array

        trace = None
        if engine.tracer.enabled:
            flow = engine.tracer.next_flow((gid, src_global, engine.rank, int(tag), call))
            nbytes = out.nbytes if out is not None else None
            trace = ("recv", {"bytes": nbytes, "peer": int(src), "group": gid, "tag": int(tag), "flow": flow})
        if self.config.shm and engine.rings is not None and engine.rings.usable(src_global):
            return RingReceive(engine.rings, src_global, (call, gid, int(tag)), name,
                               self.timeout if timeout is None else timeout, host_out, expect, finish,
                               trace[1] if trace else None)

        def make(epoch, call):
            return receive(engine, (epoch, call, "p2p", gid, int(tag), src_global, 0), src_global, host_out,
                            expect, name)
        return engine.submit(name, make, timeout=timeout, transform=finish, trace=trace, call=call)

    def recv(self, src: int, tag: int = 0, out=None, timeout: float | None = None):
        self._sequence.check_alive("recv")
        out is None or check_array("recv", self.rank, out, "out", in_place=True)
        found = shm_p2p_fast.recv(self, src, tag, out, timeout)  # the common case in one call into C, or None
        return found if found is not None else self.irecv(src, tag, out, timeout).wait()


__all__ = ["PointToPoint"]

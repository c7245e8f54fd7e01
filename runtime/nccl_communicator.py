"""NcclCommunicator: the runtime's communicator interface over NCCL, for CuPy arrays on the GPU.

    control = <a runtime Communicator over the same ranks (ZeroMQ)>
    comm = NcclCommunicator(control)      # every member calls it; one GPU per rank
    comm.all_reduce(x)                    # x a CuPy array on this rank's device, reduced in place

The control communicator carries what NCCL needs outside the GPU: rank 0 draws the NCCL unique id
and broadcasts it (NCCL's own bootstrap then connects the ranks), and point-to-point messages send
their shape and dtype ahead over it, since an NCCL receive must know its size and has no tags.

It implements `runtime.comm_interface.CommunicatorInterface`, as `runtime.communicator.Communicator`
does: `rank`, `size`, `ranks`, `timeout`, `tracer`, `bytes_sent`, `config`, `new_group`, `all_reduce` / `reduce_scatter` (sum, avg, max, min),
`all_gather` (along axis 0), `broadcast`, `barrier`, `isend` / `irecv` / `send` / `recv`, each
collective with `async_op=True` and `timeout`. Operations run on the caller's current CUDA stream, in
call order, like the kernels around them; a handle is done when the stream has passed the operation.

Timeouts, and what cannot be bounded:
- waiting for an operation is bounded (`timeout`, default the control communicator's): past it the
  NCCL communicator is aborted (ncclCommAbort frees kernels stuck on a missing peer) and CommTimeout
  names the operation and rank; the communicator is unusable afterwards;
- creating the NCCL communicator (ncclCommInitRank, all CuPy exposes) blocks until every rank has
  joined and cannot be interrupted: a control-plane barrier just before it makes that wait start
  only once every rank is alive and in the same call;
- a call that enqueues an operation returns at once, but CUDA may block the enqueue itself when its
  launch queue is full behind a stuck operation; that block is not bounded.

Rules NCCL imposes: one rank per GPU (NCCL refuses two ranks of a communicator on one device, so
multi-rank groups need several GPUs); every member issues collectives of a communicator in the
same order; point-to-point messages between two ranks are matched in the order they are issued,
so receives must be waited for in the order the peer sent them (checked: each message carries a
sequence number, and a mismatch is an error, not corrupted data).
"""
from __future__ import annotations

import time

import numpy as np

from ringpipe.runtime.arguments import check_timeout
from ringpipe.runtime.operations import CommTimeout

UNIQUE_ID_BYTES = 128
# numpy dtype name -> NCCL datatype constant name
DATATYPES = {"int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "uint32": "NCCL_UINT32",
             "int64": "NCCL_INT64", "uint64": "NCCL_UINT64", "float16": "NCCL_FLOAT16",
             "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}
# reduction name -> NCCL op constant name; "avg" is a sum divided by the size where the library lacks
# NCCL_AVG (NCCL before 2.10)
REDUCTIONS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN", "avg": "NCCL_AVG"}
POLL_S = 1e-4  # how often a waiting handle asks whether its event has passed


def datatype(nccl, dtype, where: str) -> int:
    """The NCCL datatype constant of a NumPy/CuPy dtype; TypeError naming it when NCCL has none."""
    name = DATATYPES.get(np.dtype(dtype).name)
    if name is None or not hasattr(nccl, name):
        raise TypeError(f"{where}: NCCL has no datatype for {np.dtype(dtype)}; supported: "
                        f"{', '.join(DATATYPES)}")
    return getattr(nccl, name)


def reduction(nccl, op: str, where: str):
    """(NCCL op constant, divide by size afterwards) for a reduction name; ValueError when unknown."""
    if op not in REDUCTIONS:
        raise ValueError(f"{where}: unknown reduction op {op!r}; expected one of {sorted(REDUCTIONS)}")
    if op == "avg" and not hasattr(nccl, "NCCL_AVG"):
        return nccl.NCCL_SUM, True
    return getattr(nccl, REDUCTIONS[op]), False


def exchange_unique_id(control, nccl) -> tuple:
    """Rank 0's fresh NCCL unique id, on every rank of `control` (a broadcast over the control plane)."""
    buffer = np.zeros(UNIQUE_ID_BYTES, np.int16)  # the id's bytes as CuPy hands them out: signed chars
    if control.rank == 0:
        unique_id = tuple(nccl.get_unique_id())
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise RuntimeError(f"NCCL unique id has {len(unique_id)} bytes, expected {UNIQUE_ID_BYTES}")
        buffer[:] = unique_id
    control.broadcast(buffer, src=0)
    return tuple(int(b) for b in buffer)


class CudaArrays:
    """What the communicator needs of CuPy: device pointers, the current stream, events, new arrays.
    (Tests of the wiring substitute a host version; see tests/test_nccl_communicator.py.)"""

    def __init__(self, cupy=None):
        if cupy is None:
            import cupy
        self.cupy = cupy

    def is_array(self, x) -> bool:
        return isinstance(x, self.cupy.ndarray)

    def pointer(self, x) -> int:
        return x.data.ptr

    def stream(self) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    def event(self):
        """An event recorded on the current stream now: `.done` once the stream has passed it."""
        event = self.cupy.cuda.Event(block=False, disable_timing=True)
        event.record()
        return event

    def empty(self, shape, dtype):
        return self.cupy.empty(shape, dtype)

    def device(self) -> int:
        return self.cupy.cuda.Device().id


class NcclHandle:
    """An enqueued NCCL operation: `wait()` returns its result once the stream has passed it,
    `is_done()` asks without waiting. `start` (irecv) runs first at `wait()`: what must happen before
    the operation can be enqueued."""

    def __init__(self, comm, name: str, event=None, result=None, start=None, timeout=None):
        self.comm, self.name, self.event, self.result = comm, name, event, result
        self.start, self.timeout = start, timeout
        self.error = None  # why `start` failed: every later wait raises it again

    def is_done(self) -> bool:
        return self.start is None and (self.error is not None or bool(self.event.done))

    def wait(self, timeout: float | None = None):
        limit = timeout if timeout is not None else self.timeout
        deadline = time.monotonic() + limit
        if self.start is not None:
            start, self.start = self.start, None
            try:
                self.event, self.result = start(deadline)
            except BaseException as exc:
                self.error = exc
        if self.error is not None:
            raise self.error
        while not self.event.done:
            if time.monotonic() > deadline:
                self.comm.abort(f"{self.name}: not finished after {limit}s")
            time.sleep(POLL_S)
        self.comm.check_async_error(self.name)
        return self.result


class NcclCommunicator:
    """NCCL over the ranks of `control` (a runtime Communicator); see the module docstring.

    nccl: the NCCL bindings (default `cupy.cuda.nccl`); arrays: a `CudaArrays` (default on CuPy).
    Errors: TypeError / ValueError for arrays and arguments NCCL cannot take (checked before
    anything is enqueued), CommTimeout after an abort, RuntimeError for NCCL's own errors.
    """

    def __init__(self, control, nccl=None, arrays=None, timeout: float | None = None):
        if nccl is None:
            from cupy.cuda import nccl
        if not getattr(nccl, "available", True):  # CuPy built or run without libnccl
            raise RuntimeError(f"NCCL communicator (rank {control.rank}): CuPy found no NCCL library "
                               "(cupy.cuda.nccl.available is False)")
        self.control, self.nccl = control, nccl
        self.arrays = arrays if arrays is not None else CudaArrays()
        self._timeout = timeout if timeout is not None else control.timeout
        self._sent, self._received = {}, {}  # peer -> p2p messages so far (NCCL matches them in order)
        self._nccl_bytes = 0  # payload handed to NCCL to send (collectives: what a ring sends per rank)
        self._aborted = None
        self._owns_control = False  # a control group new_group made for it goes with it (destroy)
        unique_id = exchange_unique_id(control, nccl)
        control.barrier()  # the blocking init below then starts only with every rank present
        self._comm = nccl.NcclCommunicator(control.size, unique_id, control.rank)

    rank = property(lambda self: self.control.rank)
    size = property(lambda self: self.control.size)
    ranks = property(lambda self: self.control.ranks)
    config = property(lambda self: self.control.config)
    tracer = property(lambda self: self.control.tracer)
    timeout = property(lambda self: self._timeout)  # seconds an operation may wait (default the control's)

    @property
    def bytes_sent(self) -> int:
        """Bytes this process has sent over the control plane (all its ZeroMQ communicators), plus
        the payload this communicator handed NCCL: point-to-point messages whole, collectives as
        NCCL's ring algorithm sends them per rank (all_reduce 2(n-1)/n of the buffer, all_gather,
        reduce_scatter and broadcast (n-1)/n of the whole), since NCCL itself does not report it."""
        return self.control.bytes_sent + int(self._nccl_bytes)

    def _count_ring(self, nbytes: int, factor: float):
        self._nccl_bytes += factor * (self.size - 1) / self.size * nbytes

    def __repr__(self):
        return f"NcclCommunicator(rank={self.rank}, size={self.size}, group={self.control.group.gid!r})"

    def new_group(self, ranks) -> "NcclCommunicator | None":
        """An NCCL communicator over `ranks` (indices in this one), None on ranks outside it; every
        member must call it (its own unique id goes over the control plane's matching subgroup)."""
        control = self.control.new_group(ranks)
        if control is None:
            return None
        comm = NcclCommunicator(control, self.nccl, self.arrays, self.timeout)
        comm._owns_control = True
        return comm

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _name(self, op: str) -> str:
        return f"nccl {op} (rank {self.rank} of {self.size}, group {self.control.group.gid})"

    def _check(self, x, op: str, timeout=None):
        """The checks every operation makes before enqueueing anything (the communicator's own,
        runtime/arguments.py, make the same before an operation takes its number): returns x's NCCL
        datatype."""
        check_timeout(self._name(op), self.rank, timeout)
        if self._aborted is not None:
            raise CommTimeout(f"{self._name(op)}: the NCCL communicator was aborted earlier ({self._aborted})")
        if not self.arrays.is_array(x):
            raise TypeError(f"{self._name(op)}: takes arrays on this rank's GPU (CuPy), got "
                            f"{type(x).__module__}.{type(x).__name__}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{self._name(op)}: the array must be C-contiguous (shape {tuple(x.shape)})")
        return datatype(self.nccl, x.dtype, self._name(op))

    def _handle(self, op: str, result, async_op: bool, timeout):
        handle = NcclHandle(self, self._name(op), self.arrays.event(), result,
                            timeout=timeout if timeout is not None else self.timeout)
        return handle if async_op else handle.wait()

    def abort(self, reason: str):
        """Abort the NCCL communicator (kernels waiting on peers return) and raise CommTimeout."""
        if self._aborted is None:
            self._aborted = reason
            self._comm.abort()
        raise CommTimeout(reason)

    def check_async_error(self, name: str):
        try:
            self._comm.check_async_error()
        except Exception as exc:  # NcclError: one line naming the operation and rank
            raise RuntimeError(f"{name}: {exc}") from None

    # ---- collectives ------------------------------------------------------------------------------
    def all_reduce(self, x, op: str = "sum", async_op: bool = False, timeout: float | None = None):
        """Reduce `x` over the group, in place (sum, avg, max, min); returns `x`."""
        dtype = self._check(x, "all_reduce", timeout)
        code, divide = reduction(self.nccl, op, self._name("all_reduce"))
        if op == "avg" and x.dtype.kind != "f":
            raise TypeError(f"{self._name('all_reduce')}: op 'avg' needs a floating dtype, got {x.dtype}")
        pointer = self.arrays.pointer(x)
        self._comm.allReduce(pointer, pointer, x.size, dtype, code, self.arrays.stream())
        self._count_ring(x.nbytes, 2)
        if divide:
            x *= 1.0 / self.size
        return self._handle("all_reduce", x, async_op, timeout)

    def reduce_scatter(self, x, op: str = "sum", async_op: bool = False, timeout: float | None = None):
        """This rank's 1/size slice (along axis 0) of the reduction of `x` over the group (a new array)."""
        dtype = self._check(x, "reduce_scatter", timeout)
        code, divide = reduction(self.nccl, op, self._name("reduce_scatter"))
        if x.ndim == 0 or x.shape[0] % self.size:
            raise ValueError(f"{self._name('reduce_scatter')}: x.shape[0] must be divisible by the group size "
                             f"{self.size}, got shape {tuple(x.shape)}")
        if op == "avg" and x.dtype.kind != "f":
            raise TypeError(f"{self._name('reduce_scatter')}: op 'avg' needs a floating dtype, got {x.dtype}")
        out = self.arrays.empty((x.shape[0] // self.size, *x.shape[1:]), x.dtype)
        self._comm.reduceScatter(self.arrays.pointer(x), self.arrays.pointer(out), out.size, dtype, code,
                                 self.arrays.stream())
        self._count_ring(x.nbytes, 1)
        if divide:
            out *= 1.0 / self.size
        return self._handle("reduce_scatter", out, async_op, timeout)

    def all_gather(self, x, async_op: bool = False, timeout: float | None = None):
        """Every rank's `x` concatenated along axis 0 (0-d inputs stack), a new array."""
        dtype = self._check(x, "all_gather", timeout)
        piece = x.shape if x.ndim else (1,)
        out = self.arrays.empty((self.size * piece[0], *piece[1:]), x.dtype)
        self._comm.allGather(self.arrays.pointer(x), self.arrays.pointer(out), x.size, dtype,
                             self.arrays.stream())
        self._count_ring(out.nbytes, 1)
        return self._handle("all_gather", out, async_op, timeout)

    def broadcast(self, x, src: int = 0, async_op: bool = False, timeout: float | None = None):
        """Rank `src`'s `x` into every rank's `x`, in place; returns `x`."""
        dtype = self._check(x, "broadcast", timeout)
        self._peer(src, "broadcast")
        pointer = self.arrays.pointer(x)
        self._comm.broadcast(pointer, pointer, x.size, dtype, int(src), self.arrays.stream())
        self._count_ring(x.nbytes, 1)
        return self._handle("broadcast", x, async_op, timeout)

    def barrier(self, async_op: bool = False, timeout: float | None = None):
        """Every rank has reached this call (a one-element all-reduce on the GPU)."""
        token = self.arrays.empty((1,), np.float32)
        token[...] = 0
        handle = self.all_reduce(token, async_op=True, timeout=timeout)
        return handle if async_op else handle.wait() and None

    # ---- point-to-point ---------------------------------------------------------------------------
    def _peer(self, peer, what: str) -> int:
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size:
            raise ValueError(f"{self._name(what)}: peer {peer!r} is not a rank of a group of size {self.size}")
        return int(peer)

    def isend(self, x, dst: int, tag: int = 0, timeout: float | None = None) -> NcclHandle:
        """Send `x` to `dst`: its (sequence, dtype, shape) over the control plane, the data over NCCL.
        Do not modify `x` until the handle is done."""
        dtype = self._check(x, "send", timeout)
        dst = self._peer(dst, "send")
        sequence = self._sent.get(dst, 0)
        self._sent[dst] = sequence + 1
        header = np.array([sequence, dtype, x.ndim, *x.shape], np.int64)
        self.control.send(header, dst, tag=tag, timeout=timeout)
        self._comm.send(self.arrays.pointer(x), x.size, dtype, dst, self.arrays.stream())
        self._nccl_bytes += x.nbytes
        return NcclHandle(self, self._name(f"send to rank {dst} tag {tag}"), self.arrays.event(), None,
                          timeout=timeout if timeout is not None else self.timeout)

    def send(self, x, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        self.isend(x, dst, tag, timeout).wait()

    def irecv(self, src: int, tag: int = 0, out=None, timeout: float | None = None) -> NcclHandle:
        """Receive an array from `src`; `wait()` returns it (written into `out` if given). The NCCL
        receive is enqueued at `wait()`, once the header has arrived: wait in the order `src` sent."""
        src = self._peer(src, "recv")
        check_timeout(self._name("recv"), self.rank, timeout)
        if out is not None:  # (its shape and dtype are checked against the message's header at wait())
            self._check(out, "recv")
        name = self._name(f"recv from rank {src} tag {tag}")
        header_handle = self.control.irecv(src, tag=tag, timeout=timeout)

        def start(deadline):
            header = header_handle.wait(max(deadline - time.monotonic(), 0.0))
            sequence, dtype, ndim = (int(v) for v in header[:3])
            shape = tuple(int(v) for v in header[3:3 + ndim])
            expected = self._received.get(src, 0)
            if sequence != expected:
                raise RuntimeError(f"{name}: this is message {sequence} from rank {src}, but NCCL delivers "
                                   f"message {expected} next; wait for receives in the order the peer sent them")
            self._received[src] = expected + 1
            fits = out is not None and tuple(out.shape) == shape and datatype(self.nccl, out.dtype, name) == dtype
            target = out if fits else self.arrays.empty(shape, _numpy_dtype(self.nccl, dtype))
            self._comm.recv(self.arrays.pointer(target), target.size, dtype, src, self.arrays.stream())
            if out is not None and not fits:
                # Received all the same (into a scratch array): NCCL delivers a peer's messages in
                # order, and the next receive from it must get the next one.
                raise ValueError(f"{name}: out is {out.dtype}{list(out.shape)}, the message "
                                 f"{_numpy_dtype(self.nccl, dtype)}{list(shape)}")
            return self.arrays.event(), target

        return NcclHandle(self, name, start=start, timeout=timeout if timeout is not None else self.timeout)

    def recv(self, src: int, tag: int = 0, out=None, timeout: float | None = None):
        return self.irecv(src, tag, out, timeout).wait()

    def destroy(self):
        """Free the NCCL communicator (not needed after an abort), and the control group new_group
        made for it (not one the caller handed in)."""
        if self._aborted is None:
            self._comm.destroy()
        if self._owns_control:
            self.control.destroy()


def _numpy_dtype(nccl, code: int) -> np.dtype:
    for name, constant in DATATYPES.items():
        if getattr(nccl, constant, None) == code:
            return np.dtype(name)
    raise ValueError(f"unknown NCCL datatype {code}")

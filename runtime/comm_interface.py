"""The communicator interface the model code relies on, whatever moves the bytes.

`runtime.communicator.Communicator` (ZeroMQ and shared memory, NumPy or staged CuPy arrays) and
`runtime.nccl_communicator.NcclCommunicator` (NCCL, CuPy arrays on the GPU) both implement it; code
above the runtime (layers, schedules, trainers) uses only these members, never a communicator's
engine or configuration. Ranks are group-local: `rank` is this process's index in the group and
`dst` / `src` are indices in the same group.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class CommHandle(Protocol):
    """An operation started with `isend` / `irecv` / `async_op=True`."""

    def wait(self, timeout: float | None = None) -> Any:
        """The operation's result (a received array, the collective's output); raises its error."""

    def is_done(self) -> bool:
        """True once `wait()` would return without blocking."""


@runtime_checkable
class CommunicatorInterface(Protocol):
    """A group of ranks: point-to-point messages and collectives. Every member calls a collective,
    in the same order with the same shape, dtype, reduction and root; a disagreement or a peer
    silent past `timeout` raises a `runtime.CommError` naming the operation, rank and peer.
    `timeout` arguments are seconds (default: the communicator's `timeout`). A bad argument (not an
    array where the result is written into it, read-only there, a non-numeric dtype, an unknown
    op, a timeout not above 0) raises TypeError or ValueError on its rank before the operation
    starts, so the group's later operations stay in step (runtime/arguments.py)."""

    @property
    def rank(self) -> int:
        """This process's index in the group (0 <= rank < size)."""

    @property
    def size(self) -> int:
        """Number of ranks in the group."""

    @property
    def ranks(self) -> tuple:
        """The members' ranks in the world group, in group order."""

    @property
    def timeout(self) -> float:
        """Seconds an operation may wait for a peer before it fails."""

    @property
    def tracer(self):
        """This process's trace recorder (`runtime.trace.Tracer`): `with comm.tracer.span(...)`."""

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this process has sent so far, over all its communicators (a running total)."""

    def new_group(self, ranks) -> "CommunicatorInterface | None":
        """A communicator over `ranks` (indices in this one); None on ranks outside it. Every member calls it."""

    def destroy(self) -> None:
        """Give the group's resources back once done with it (every member calls it; not the world group)."""

    # ---- point-to-point -------------------------------------------------------------------------
    def isend(self, x, dst: int, tag: int = 0, timeout: float | None = None) -> CommHandle:
        """Start sending array `x` to `dst`; do not modify `x` until the handle is done."""

    def irecv(self, src: int, tag: int = 0, out=None, timeout: float | None = None) -> CommHandle:
        """Start receiving an array from `src`; `wait()` returns it (written into `out` if given)."""

    def send(self, x, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """`isend(...).wait()`."""

    def recv(self, src: int, tag: int = 0, out=None, timeout: float | None = None):
        """`irecv(...).wait()`."""

    # ---- collectives ----------------------------------------------------------------------------
    def all_reduce(self, x, op: str = "sum", async_op: bool = False, timeout: float | None = None):
        """Reduce `x` over the group in place (sum, avg, max, min); returns `x` (or a handle)."""

    def all_gather(self, x, async_op: bool = False, timeout: float | None = None):
        """Every rank's `x` (same shape everywhere) concatenated along axis 0; shape (size*x.shape[0], ...)."""

    def reduce_scatter(self, x, op: str = "sum", async_op: bool = False, timeout: float | None = None):
        """This rank's 1/size slice along axis 0 of the reduction of `x`; x.shape[0] divisible by size."""

    def broadcast(self, x, src: int = 0, async_op: bool = False, timeout: float | None = None):
        """Rank `src`'s `x` into every rank's `x`, in place; returns `x` (or a handle)."""

    def barrier(self, async_op: bool = False, timeout: float | None = None):
        """Returns once every member has called it."""


__all__ = ["CommunicatorInterface", "CommHandle"]

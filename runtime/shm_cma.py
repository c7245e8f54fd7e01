"""Single-copy collectives on a same-host group channel (runtime/shm_channel.py): each member
publishes where its array lies (pid, address, bytes) in its channel region, and its peers read what
they need straight from that array with one cross-memory copy (runtime/cma.py, process_vm_readv),
instead of the member first copying it into its shared buffer (runtime/shm_collectives.py), as
OpenMPI's shared-memory transport does for large messages.
- all_reduce: per round (up to n channel buffers), a reduce-scatter then an all-gather: this rank
  reads its part of every peer's array, chunk by chunk into a scratch that stays in the caches, and
  sums it in rank order with its own part (runtime/reduce_kernels.py) into its array and, in the
  same pass, into its channel buffer; once every member published its sums it copies each peer's
  part from that peer's buffer. Bitwise the sums of the arena paths: the same order, the same kernel.
- reduce_scatter: this rank's row of every peer's array, summed as all_reduce's part;
- all_gather: every peer's array into its row of the output; broadcast: the root's array.
One round each; the first round (`begin`) carries the signature, checked by every member. Which
operations and sizes take this path: MIN_READ_BYTES (on this machine, large all_reduce and
broadcast only; `chosen` decides, alike on every member).

No member returns, and so frees or changes its array, while a peer may still read it:
- all_reduce: a member reads a peer's array only before publishing its sums; the peer changes those
  elements only after it waited for that publish, and returns only after that. The all-gather half
  reads the peers' channel buffers, which the channel's parity rule protects as any round's.
- reduce_scatter, all_gather, broadcast: after its reads a member publishes once more ("done
  reading"), and a member whose array peers read (every member; in a broadcast, the root) waits
  for every member's "done" before it returns.

Probe (runtime/cma.py's, as `sendrecv`'s): the first time a channel would take this path, every
member also publishes its pid and its probe word's address and nonce (`cma.probe_word`); each
probes every peer (`cma.can_read`) and publishes its verdict, yes when every probe said yes and
this process reads single-copy at all (`cma.wanted()`: not `RINGPIPE_CMA=0` nor
`cma.set_mode("off")`): the group takes this path only when every verdict is yes, decided alike on
every member; else the arena path for the channel's life.
"""
from __future__ import annotations

import errno
import os

import numpy as np

from ringpipe.runtime import cma, stream_store
from ringpipe.runtime.operations import CommError
from ringpipe.runtime.reduce_kernels import c_sum, reduce_into

# Where this path is taken: once a rank reads more than this many bytes of its peers' arrays (a
# broadcast: per reader of the root's, see `chosen`; None: never). A cross-memory read costs ~10 us per call and ~0.7 us per 4 KiB page here (process_vm_readv
# in this VM: 3.5 GB/s in 64 KiB reads, 5 GB/s in 1 MiB ones, against ~23 GB/s for a memcpy in
# cache and ~6 GB/s out of it), so it pays only where it saves a copy of data that no longer fits
# in the caches. Measured on 2 cores, CPU of a call summed over ranks, single-copy / arena:
# all_reduce 2 ranks 2 MiB 1.08, 4 MiB 0.87-1.00, 8 MiB 0.86, 64 MiB 0.80; 4 ranks 1 MiB 1.01,
# 2 MiB 0.96, 4 MiB 0.86-0.89, 64 MiB 0.74; broadcast 2 ranks 1 MiB ~1.0, 2 MiB 0.80, 4 MiB 0.59;
# 4 ranks 2 MiB 1.05, 4 MiB 0.81 (0.79x main's speed in `bench collectives`), 8 MiB 0.88, 64 MiB
# 0.66. all_gather saves one copy of n (the copy into the shared buffer) and pays ~1.3x a memcpy
# per byte read: 2 ranks (total) 4 MiB 0.81, 16 MiB 0.69, 64 MiB 0.76; 4 ranks 4 MiB 1.14, 64 MiB
# 1.04: at most MAX_RANKS. reduce_scatter: 2 ranks 4 MiB 1.16, 64 MiB 0.91; 4 ranks 1.21, 1.05.
MIN_READ_BYTES = {"all_reduce": 2 << 20, "broadcast": 2 << 20, "all_gather": 1 << 20, "reduce_scatter": None}
MAX_RANKS = {"all_gather": 2}
# Operations whose arena path pipelines in chunks that take turns in two slots of the buffer while
# every member has a core (shm_collectives.chunk_elements, chunk_start): there it beats this path at
# every size. 2 ranks on the 2-vCPU EPYC VM, `bench collectives --compare mpi`, two interleaved pairs,
# arena / single-copy: all_reduce 8 MiB 1,117-1,153 / 1,493-2,854 us, 16 MiB 2,522-2,629 /
# 3,218-4,892, 64 MiB 9,831-12,078 / 13,783-16,474.
PIPELINED = {"all_reduce"}
HOST_CORES = os.cpu_count() or 1
READ_CHUNK_BYTES = 256 << 10  # per peer: fewer calls (the fixed cost) while the chunks stay in L2 / L3
# This module's words in a channel region's header (after both parities' signatures, which end at
# 2112): pid, probe word's address, nonce, verdict, whether this collective probes, then per parity
# the array's address and bytes.
REGION_AT, PID, PROBE, NONCE, VERDICT, PROBING, ARRAY = 3584, 0, 1, 2, 3, 4, 5
YES, NO = 1, 2


def chosen(channel, op: str, nbytes: int) -> bool:
    """Whether collective `op` on `nbytes` (all_reduce, broadcast: the array; all_gather: one
    member's piece; reduce_scatter: the (n, m) input) takes this path on `channel`: alike on every
    member (sizes match, or the first round's signature check fails). False once the channel's
    probe said no; True before it (the probe runs in `begin`)."""
    least, n = MIN_READ_BYTES[op], channel.n
    if least is None or n > MAX_RANKS.get(op, n) or getattr(channel, "single_copy", None) is False:
        return False
    if op in PIPELINED and n <= HOST_CORES:  # (the host's count, alike on every member, as chunk_elements')
        return False
    # A broadcast's arena path copies the root's array once into a buffer that n - 1 members then
    # read from the shared caches: the more readers, the longer that one copy keeps up.
    if op == "broadcast":
        return nbytes // (n - 1) > least
    return (nbytes * (n - 1) if op == "all_gather" else nbytes * (n - 1) // n) > least  # (all_reduce, reduce_scatter)


class SingleCopy:
    """A channel's single-copy state: every member's header words, pids, a reader and a scratch."""

    def __init__(self, channel):
        self.words = [memoryview(region[REGION_AT : REGION_AT + 8 * (ARRAY + 4)]).cast("Q")
                      for region in channel.regions]
        self.reader = cma.Reader()
        self.pids = [0] * channel.n
        self.chunk_bytes = READ_CHUNK_BYTES
        self.scratch = np.empty(max(channel.n - 1, 1) * self.chunk_bytes, np.uint8)
        self.scratch_at = int(self.scratch.ctypes.data)

    def verdict(self, channel) -> int:
        """YES when this process reads single-copy and every peer's probe word reads back right."""
        peers = [self.words[peer] for peer in range(channel.n) if peer != channel.me]
        readable = cma.wanted() and all(cma.can_read(self.reader, int(words[PID]), int(words[PROBE]), int(words[NONCE]))
                                        for words in peers)
        return YES if readable else NO


def begin(channel, array: np.ndarray) -> int | None:
    """The first round of a single-copy collective on `array` (C-contiguous): publishes where it
    lies and the collective's signature, waits for every member and checks their signatures.
    Returns the round's parity, or None when the group does not read single-copy (decided by the
    probe; nothing was read then, and the caller takes the arena path)."""
    state = getattr(channel, "single_copy", None)
    probing = state is None
    if probing:
        state = SingleCopy(channel)
    n, me = channel.n, channel.me
    parity = channel.next_round()
    mine = state.words[me]
    mine[ARRAY + 2 * parity], mine[ARRAY + 2 * parity + 1] = array.ctypes.data, array.nbytes
    if probing:
        mine[PROBE], mine[NONCE] = cma.probe_word()
        mine[PID], mine[VERDICT] = os.getpid(), 0
    mine[PROBING] = probing
    channel.write_signature(parity)
    channel.publish()
    channel.wait_all()
    channel.check_signatures(parity)
    for peer in range(n):  # (only an abort in the middle of a probe could leave members disagreeing)
        if state.words[peer][PROBING] != probing:
            raise CommError(f"{channel.name}: rank {channel.group.ranks[peer]} is out of step with rank "
                            f"{channel.engine.rank} on the single-copy probe (after an earlier failure)")
    if probing:
        # Every member probes its peers before it publishes its verdict (each probe word lives as
        # long as its process).
        mine[VERDICT] = state.verdict(channel)
        channel.publish()
        channel.wait_all()
        if any(state.words[member][VERDICT] != YES for member in range(n)):
            channel.single_copy = False
            return None
        state.pids = [int(words[PID]) for words in state.words]
        channel.single_copy = state
    for peer in range(n):
        if state.words[peer][ARRAY + 2 * parity + 1] != array.nbytes:
            raise CommError(f"{channel.name}: rank {channel.group.ranks[peer]} published an array of "
                            f"{state.words[peer][ARRAY + 2 * parity + 1]} bytes, this rank one of {array.nbytes}")
    return parity


def _address(channel, peer: int, parity: int) -> int:
    return int(channel.single_copy.words[peer][ARRAY + 2 * parity])


def _read(channel, peer: int, remote_address: int, nbytes: int, out_address: int) -> None:
    state = channel.single_copy
    try:
        state.reader.read(state.pids[peer], remote_address, nbytes, out_address)
    except OSError as exc:
        gone = " (it has exited)" if exc.errno == errno.ESRCH else ""
        raise CommError(f"{channel.name}: reading rank {channel.group.ranks[peer]}'s array (pid {state.pids[peer]}) "
                        f"failed{gone}: {os.strerror(exc.errno or 0)}") from None


def _done_reading(channel, wait: bool = True) -> None:
    channel.publish()
    if wait:
        channel.wait_all()


def _reduce_part(channel, published: int, row_at: int, own: np.ndarray, lo: int, hi: int, reduce, divisor: int,
                 out: np.ndarray, copy: np.ndarray | None) -> None:
    """out[:hi-lo] (and copy[:hi-lo]) = elements lo..hi of every member's array, reduced in rank
    order and divided by `divisor` when non-zero; this rank's own from `own` (its array, flat),
    every peer's read from byte `row_at` of the array it published in parity `published`'s round
    (the collective's first), chunk by chunk."""
    n, me, state = channel.n, channel.me, channel.single_copy
    dtype, itemsize = own.dtype, own.itemsize
    chunk = max(1, state.chunk_bytes // itemsize)
    kernel = c_sum(dtype, reduce)
    remote = [_address(channel, peer, published) + row_at for peer in range(n)]
    own_at, out_at, copy_at = own.ctypes.data, out.ctypes.data, 0 if copy is None else copy.ctypes.data
    # (with a copy, `out` is a buffer)
    stream_min = stream_store.stream_min_bytes(channel.host_ranks) if copy is not None else 0
    for start in range(lo, hi, chunk):
        count = min(chunk, hi - start)
        nbytes, skip = count * itemsize, (start - lo) * itemsize
        slots = []
        for peer in range(n):
            if peer == me:
                slots.append(own_at + start * itemsize)
            else:
                slot = state.scratch_at + (peer - (peer > me)) * state.chunk_bytes
                _read(channel, peer, remote[peer] + start * itemsize, nbytes, slot)
                slots.append(slot)
        if kernel is not None:  # addresses by arithmetic, as in shm_collectives._reduce_round
            kernel(slots, count, divisor, out_at + skip, copy_at + skip if copy_at else 0, 0 < stream_min <= nbytes)
        else:
            views = [own[start : start + count] if peer == me else
                     _scratch_view(state, slots[peer] - state.scratch_at, dtype, count) for peer in range(n)]
            reduce_into(reduce, views, out[start - lo : start - lo + count], None if copy is None else
                        copy[start - lo : start - lo + count], divisor)


def _scratch_view(state, offset: int, dtype, count: int) -> np.ndarray:
    return state.scratch[offset : offset + count * np.dtype(dtype).itemsize].view(dtype)


def all_reduce(channel, work: np.ndarray, reduce, divisor: int = 0) -> np.ndarray | None:
    """Reduce the C-contiguous 1-D `work` over the group in place (then divide by a non-zero
    `divisor`); None when the group does not read single-copy (nothing done then)."""
    n, me = channel.n, channel.me
    dtype, size = work.dtype, work.size
    per_round = n * channel.elements_per_round(work.itemsize)  # this rank's sums fill its buffer at most
    published = None  # the parity of the first round, whose header words say where the arrays lie
    for start in range(0, size, per_round):
        end = min(start + per_round, size)
        parity = begin(channel, work) if start == 0 else channel.next_round()
        if parity is None:
            return None
        published = parity if start == 0 else published
        bounds = [start + (end - start) * i // n for i in range(n + 1)]
        lo, hi = bounds[me], bounds[me + 1]
        sums = channel.buffer(me, parity, dtype, hi - lo)
        _reduce_part(channel, published, 0, work, lo, hi, reduce, divisor, sums, work[lo:hi])
        channel.publish()
        channel.wait_all()
        for peer in range(n):
            if peer != me:
                work[bounds[peer] : bounds[peer + 1]] = channel.buffer(peer, parity, dtype, bounds[peer + 1] - bounds[peer])
        channel.engine.count_sent(channel.group.gid, 2 * (n - 1) * ((end - start) * work.itemsize // n))
    return work


def reduce_scatter(channel, work: np.ndarray, reduce, divisor: int = 0) -> np.ndarray | None:
    """`work` (n, m), C-contiguous: this rank's reduced row (m,), summed in rank order then divided
    by a non-zero `divisor`; None when the group does not read single-copy."""
    me, columns = channel.me, work.shape[1]
    parity = begin(channel, work)
    if parity is None:
        return None
    result = np.empty(columns, work.dtype)
    row = work[me]
    _reduce_part(channel, parity, me * columns * work.itemsize, row, 0, columns, reduce, divisor, result, None)
    _done_reading(channel)
    channel.engine.count_sent(channel.group.gid, (channel.n - 1) * columns * work.itemsize)
    return result


def all_gather(channel, flat: np.ndarray, pieces: np.ndarray) -> np.ndarray | None:
    """pieces[i] = member i's C-contiguous 1-D `flat` (`pieces` (n, flat.size), C-contiguous); None
    when the group does not read single-copy."""
    parity = begin(channel, flat)
    if parity is None:
        return None
    pieces[channel.me] = flat
    for peer in range(channel.n):
        if peer != channel.me:
            _read(channel, peer, _address(channel, peer, parity), flat.nbytes, pieces[peer].ctypes.data)
    _done_reading(channel)
    channel.engine.count_sent(channel.group.gid, (channel.n - 1) * flat.nbytes)
    return pieces


def broadcast(channel, work: np.ndarray, root: int) -> np.ndarray | None:
    """Root's C-contiguous 1-D `work` into every member's `work`; None when the group does not read
    single-copy. Only the root waits for the others' "done reading": a member that leaves first
    meets the others again at the next collective's first round, in the other parity."""
    parity = begin(channel, work)
    if parity is None:
        return None
    if channel.me != root:
        _read(channel, root, _address(channel, root, parity), work.nbytes, work.ctypes.data)
    _done_reading(channel, wait=channel.me == root)
    if channel.me == root:
        channel.engine.count_sent(channel.group.gid, (channel.n - 1) * work.nbytes)
    return work


__all__ = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "begin", "chosen", "MIN_READ_BYTES",
           "MAX_RANKS"]

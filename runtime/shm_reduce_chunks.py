"""The chunk loop of a large same-host all_reduce round in C (runtime/csrc/shm_reduce_chunks.c).

shm_collectives._reduce_round pipelines a buffer-sized round in chunks: copy in, reduce this rank's
part, copy out the peers' sums, with the next chunk's copy in between. In Python each step costs
tens of µs of interpreter and wait bookkeeping, which is why its chunks were 4 MiB: too large for
the pipeline to keep a chunk in the caches between the steps. Here the whole loop is one call (the
waits spin in C), so chunks can be small (CHUNK_BYTES in shm_collectives). The steps, the publishes
and the order of the sums are the Python loop's, so members in either loop meet and get the same
bits; the Python loop runs where this one does not (no C helper, a dtype or reduction it does not
take, NumPy sums asked for, `RINGPIPE_SHM_CHUNKS=0`).

A wait that the spin does not end returns to Python, which waits as every channel wait does
(GroupChannel._wait: futex sleeps in slices, aborts, deadline, epoch, a member that destroyed the
group), then resumes the loop.
"""
from __future__ import annotations

import os

import numpy as np

from ringpipe.runtime import reduce_kernels, stream_choice, stream_store
from ringpipe.runtime.trace import now_ns
from ringpipe.runtime.shm_channel import EPOCH_SHIFT

# The state's words (csrc/shm_reduce_chunks.c's enum).
R_N, R_ME, R_PIECE, R_SIZE, R_ITEMSIZE, R_DTYPE, R_OP, R_DIVISOR, R_CHUNK, R_EPOCH, R_COUNT, R_STEP = range(12)
R_INDEX, R_PEER, R_TARGET, R_SPIN_NS, R_YIELD, R_FIRST, R_WAITED_NS, R_STREAM_MIN, R_SPIN_IN_NS, R_ARRIVAL_NS = range(12, 22)
R_MEMBERS, R_PER_MEMBER = 24, 3
DONE, WAIT, SIGNATURES, UNSUPPORTED = 0, 1, 2, 3
STEP_WAIT_COPIES = 1  # (the C loop's steps) a wait there at chunk 0 of the first round: the members' arrival
MAX_MEMBERS = 64  # the C loop's inputs array


def _library(channel):
    """The compiled helper (the channel's "c" waiter's library), or None: also where sums are to be
    NumPy's (reduce_kernels' "numpy" mode, which keeps the Python loop's fallback tested)."""
    if os.environ.get("RINGPIPE_SHM_CHUNKS", "1") == "0" or reduce_kernels.mode() != "c":
        return None
    lib = getattr(channel.waiter, "_lib", None)
    return lib if lib is not None and hasattr(lib, "rp_reduce_chunks") else None


def runs_in_c(channel) -> bool:
    """Whether this process runs the chunk loop in C on `channel` (its helper there, no NumPy sums asked
    for, not RINGPIPE_SHM_CHUNKS=0, at most MAX_MEMBERS): the latency path's round that runs this loop
    (runtime/shm_small.py's KIND_HALVES) is taken only then too, so that those knobs keep the Python
    loop on every all_reduce."""
    return channel.n <= MAX_MEMBERS and _library(channel) is not None


def reduce_round(channel, piece: np.ndarray, reduce, divisor: int, first: bool, chunk: int) -> bool:
    """Run one round of shm_collectives._reduce_round on `piece` (contiguous, 1-D) in C, in chunks of
    `chunk` elements; False (nothing done) where the C loop does not take it."""
    dtype_code, op_code = reduce_kernels.C_DTYPES.get(piece.dtype), reduce_kernels.C_OPS.get(reduce)
    lib = _library(channel)
    n, me = channel.n, channel.me
    if lib is None or dtype_code is None or op_code is None or not piece.flags.c_contiguous or n > MAX_MEMBERS:
        return False
    if divisor and (op_code != 0 or dtype_code > 1):  # an average: a sum of floats (the C loop divides those)
        return False
    states = getattr(channel, "_chunk_states", None)
    if states is None:  # one state per parity, with its address: the members' words and buffers written once
        states = channel._chunk_states = []
        for parity in range(2):
            state = np.zeros(R_MEMBERS + R_PER_MEMBER * n, np.int64)
            state[R_N], state[R_ME] = n, me
            for member in range(n):
                at = R_MEMBERS + R_PER_MEMBER * member
                state[at : at + R_PER_MEMBER] = [channel.words[member], channel.sleepers[member],
                                                 channel.buffer_address(member, parity)]
            states.append((state, state.ctypes.data))
    parity = channel.next_round()
    state, address = states[parity]
    # Item by item: a Python list into the array costs more (these calls run between a data-parallel
    # step's kernels, the caches cold).
    state[R_PIECE], state[R_SIZE], state[R_ITEMSIZE] = piece.__array_interface__["data"][0], piece.size, piece.itemsize
    state[R_DTYPE], state[R_OP], state[R_DIVISOR], state[R_CHUNK] = dtype_code, op_code, divisor, chunk
    state[R_EPOCH], state[R_COUNT], state[R_STEP], state[R_INDEX] = channel.epoch << EPOCH_SHIFT, channel.count, 0, 0
    state[R_PEER], state[R_TARGET], state[R_SPIN_NS] = 0, 0, channel.spin.ns()
    state[R_SPIN_IN_NS] = channel.spin.inside_ns()  # past the collective's first wait (the C loop's arrived)
    state[R_YIELD], state[R_FIRST], state[R_WAITED_NS], state[R_ARRIVAL_NS] = channel.spin.yields, first, 0, 0
    # Streamed or not: by the channel's probes (runtime/stream_choice.py), else the size rule.
    choice = getattr(channel, "stream_choice", None)  # (None: a channel without one, the size rule)
    choice = None if choice is None else choice.ctypes.data
    state[R_STREAM_MIN] = lib.rp_stream_choose(choice, stream_choice.KIND_HALVES, piece.nbytes,
                                               stream_store.stream_min_bytes(channel.host_ranks),
                                               stream_store.stream_min_bytes(channel.host_ranks, piece.nbytes))
    arrival_ns = 0  # (the members' arrival, waited for here: not part of what the choice changes)
    if first:
        channel.write_signature(parity)
    try:
        while True:
            status = lib.rp_reduce_chunks(address)
            channel.count = int(state[R_COUNT])  # the publishes it made, for the channel's next round
            if status == DONE:
                lib.rp_stream_record(choice, arrival_ns + int(state[R_ARRIVAL_NS]))
                return True
            if status == WAIT:
                arrival = first and state[R_INDEX] == 0 and state[R_STEP] == STEP_WAIT_COPIES
                started = now_ns() if arrival else 0
                channel._wait(int(state[R_PEER]), int(state[R_TARGET]), inside=not arrival)
                arrival_ns += now_ns() - started if arrival else 0
            elif status == SIGNATURES:
                channel.check_signatures(parity)
            else:
                raise RuntimeError(f"shm_reduce_chunks: status {status} at step {int(state[R_STEP])}")
    finally:
        channel.wait_ns += int(state[R_WAITED_NS])  # its spins (the channel's own waits count theirs)


__all__ = ["reduce_round", "runs_in_c"]

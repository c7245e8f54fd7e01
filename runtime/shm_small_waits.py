"""The latency path's slow ends (runtime/shm_small.py): a round's wait once its spin did not end it,
in slices that look at aborts, cancellation, given-up collectives, a peer that destroyed the group
and the deadline (as GroupChannel._wait does for the Python path), and the error of a round that
failed, named as the Python path names it."""
from __future__ import annotations

import time

from ringpipe.runtime.operations import Aborted, CommTimeout
from ringpipe.runtime.shm_channel import SLICE_S

# The control block's words (csrc/shm_small.c's enum) these use.
C_SPIN_NS, C_TIMEOUT_NS, C_PEER = 6, 8, 14
PENDING, LATER_EPOCH = 1, 2


def name_of(comm, name: str, seq: int) -> str:
    return f"{name} #{seq} on group {comm.group.gid} (rank {comm.rank} of {comm.size})"


def sleep(small, comm, name, seq, key, deadline, patience) -> int:
    """The round's wait once the spin did not end it: sleeps of at most SLICE_S in C, looking at
    aborts, cancellation, given-up collectives and the deadline between them (as the Python
    path's GroupChannel._wait)."""
    channel, words = small.channel, small.words
    engine, ranks = channel.engine, channel.group.ranks
    full_name = name_of(comm, name, seq)
    engine.direct_wait = (full_name, time.monotonic(), ranks[words[C_PEER]])
    try:
        while True:
            left = deadline - time.monotonic()
            words[C_TIMEOUT_NS] = int(max(0.0, min(SLICE_S, left)) * 1e9)
            words[C_SPIN_NS] = 0  # no spin after the first call
            status = small.lib.rp_small_round(small.address)
            if status != PENDING:
                return status
            if engine.aborted_call is not None or engine.epoch != channel.epoch:
                raise Aborted(engine.aborted_call or f"{full_name}: aborted on rank {engine.rank}")
            if key[1] <= channel._cancelled_through:
                raise channel._cancelled(full_name)
            given_up = engine.aborted.get(key)
            if given_up is not None:  # a member's call ended without it, or it saw a mismatch
                raise given_up[0](given_up[1])
            if ranks[words[C_PEER]] in channel.gone:  # it destroyed the group: one last look at what it published
                words[C_TIMEOUT_NS] = 0
                status = small.lib.rp_small_round(small.address)
                if status != PENDING:
                    return status
                raise channel.destroyed(full_name, ranks[words[C_PEER]])
            if time.monotonic() >= deadline:
                peer = ranks[words[C_PEER]]
                engine.timed_out_on.add(peer)
                raise CommTimeout(f"{full_name} on rank {engine.rank} timed out after {patience:g}s "
                                  f"waiting for a message from rank {peer}")
    finally:
        engine.direct_wait = None

def fail(small, comm, name, seq, status, parity, described, signature_id, position):
    channel, peer = small.channel, int(small.words[C_PEER])
    full_name = name_of(comm, name, seq)
    if status == LATER_EPOCH:
        raise Aborted(f"{full_name}: rank {peer} was aborted (it is at a later epoch)")
    # The channel's own check names the member and both signatures.
    channel.name, channel.signature_dict = full_name, described
    channel.signature_id, channel.position = signature_id, position
    channel.check_signatures(parity)
    raise RuntimeError(f"{full_name}: the shared-memory round failed with status {status}")  # unreachable

"""The conjugate communication regions of tensor (and sequence) parallelism, Megatron-LM's vocabulary.

Each region is a named pair: what happens to activations going forward, and to their gradients
coming back. Every function takes the tensor-parallel communicator explicitly.

    region                                      forward                  backward
    copy_to_tensor_parallel_region              identity                 all-reduce
    reduce_from_tensor_parallel_region          all-reduce               identity
    scatter_to_sequence_parallel_region         keep my sequence slice   all-gather along the sequence
    gather_from_sequence_parallel_region        all-gather along seq.    reduce-scatter along the sequence
    reduce_scatter_to_sequence_parallel_region  reduce-scatter along s.  all-gather along the sequence

Layout: activations are (B, T, C) everywhere; a sequence-parallel shard is (B, T/tp, C), rank r
holding positions [r·T/tp, (r+1)·T/tp). The runtime gathers and scatters along axis 0, so the
sequence collectives move T to the front, (T, B, C) contiguous, and back.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ringpipe.runtime.array_module import module_of


class Region(NamedTuple):
    """A communication region: `forward(x, comm)` and its conjugate `backward(dy, comm)`."""
    name: str
    forward: Callable
    backward: Callable


# ---- the collectives along the sequence axis (axis 1 of (B, T, C)) --------------------------------------
def sequence_slice(length: int, comm) -> slice:
    """The positions of a length-`length` sequence held by this rank."""
    if length % comm.size:
        raise ValueError(f"sequence parallel: sequence length {length} is not divisible by the tensor-parallel "
                         f"size {comm.size} (rank {comm.rank})")
    part = length // comm.size
    return slice(comm.rank * part, (comm.rank + 1) * part)


def all_gather_sequence(x, comm):
    """(B, T/tp, C) shards -> (B, T, C), ranks' shards in rank order."""
    xp = module_of(x)
    gathered = comm.all_gather(xp.ascontiguousarray(x.swapaxes(0, 1)))
    return xp.ascontiguousarray(gathered.swapaxes(0, 1))


def reduce_scatter_sequence(x, comm):
    """(B, T, C) partial sums -> (B, T/tp, C): this rank's positions of their sum over the group."""
    xp = module_of(x)
    sequence_slice(x.shape[1], comm)  # a clear error before the collective
    mine = comm.reduce_scatter(xp.ascontiguousarray(x.swapaxes(0, 1)))
    return xp.ascontiguousarray(mine.swapaxes(0, 1))


def split_sequence(x, comm):
    """(B, T, C) replicated -> (B, T/tp, C), this rank's positions (no communication)."""
    return module_of(x).ascontiguousarray(x[:, sequence_slice(x.shape[1], comm)])


def _all_reduce(x, comm):
    return comm.all_reduce(x) if comm.size > 1 else x


def _identity(x, comm):
    return x


# Without tensor parallelism: nothing to communicate, forward or backward.
IDENTITY = Region("identity", forward=_identity, backward=_identity)

# ---- tensor-parallel regions ----------------------------------------------------------------------------
# Before a column-parallel layer: every rank needs the whole input; each contributes part of its gradient.
copy_to_tensor_parallel_region = Region("copy_to_tensor_parallel_region", forward=_identity, backward=_all_reduce)
# After a row-parallel layer: the partial outputs sum to the output; its gradient is already whole.
reduce_from_tensor_parallel_region = Region("reduce_from_tensor_parallel_region", forward=_all_reduce,
                                            backward=_identity)

# ---- sequence-parallel regions --------------------------------------------------------------------------
scatter_to_sequence_parallel_region = Region("scatter_to_sequence_parallel_region", forward=split_sequence,
                                             backward=all_gather_sequence)
# Before a column-parallel layer: gather the sequence shards; the gradients' partial sums scatter back.
gather_from_sequence_parallel_region = Region("gather_from_sequence_parallel_region", forward=all_gather_sequence,
                                              backward=reduce_scatter_sequence)
# After a row-parallel layer: sum the partial outputs, keep my positions; the gradient shards gather.
reduce_scatter_to_sequence_parallel_region = Region("reduce_scatter_to_sequence_parallel_region",
                                                    forward=reduce_scatter_sequence, backward=all_gather_sequence)


def input_region(sequence_parallel: bool) -> Region:
    """The region in front of a column-parallel layer."""
    return gather_from_sequence_parallel_region if sequence_parallel else copy_to_tensor_parallel_region


def output_region(sequence_parallel: bool) -> Region:
    """The region behind a row-parallel layer (and the vocab-parallel embedding)."""
    return reduce_scatter_to_sequence_parallel_region if sequence_parallel else reduce_from_tensor_parallel_region

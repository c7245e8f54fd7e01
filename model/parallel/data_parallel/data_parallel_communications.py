"""The collectives of data parallelism, on flat 1-D buckets and over the data-parallel communicator.

    reduce_gradients      average a bucket over dp: all-reduce (every rank gets all of it) or
                          reduce-scatter (ZeRO: each rank gets its 1/dp shard); asynchronous
    gather_shard(s)       all-gather each rank's 1/dp shard of a bucket (or of several) into full ones
    shard_bounds          which elements of a bucket rank r owns

A bucket's length is a multiple of dp when it is sharded, so every shard has the same size.
"""
from __future__ import annotations


def shard_bounds(size: int, rank: int, dp: int) -> slice:
    """Elements [rank·size/dp, (rank+1)·size/dp) of a bucket of `size` elements (a multiple of dp)."""
    if size % dp:
        raise ValueError(f"data parallel: a sharded bucket of {size} elements is not a multiple of dp={dp}")
    per = size // dp
    return slice(rank * per, (rank + 1) * per)


def reduce_gradients(dp_comm, grads, shard: bool):
    """Start averaging the flat gradient bucket `grads` over the data-parallel group.

    Returns a handle whose `wait()` gives the averaged bucket (all-reduce, written into `grads`) or
    this rank's averaged shard (reduce-scatter, a new array; `grads` must stay untouched until then).
    """
    if shard:
        return dp_comm.reduce_scatter(grads, op="avg", async_op=True)
    return dp_comm.all_reduce(grads, op="avg", async_op=True)


def gather_shard(dp_comm, shard):
    """Start gathering every rank's `shard` of one bucket; `wait()` gives the full bucket. `shard`
    must stay untouched until then."""
    return dp_comm.all_gather(shard, async_op=True)


def gather_shards(dp_comm, shards: list) -> list:
    """Every rank's shard of each bucket, concatenated in rank order: full buckets. All gathers are
    in flight together, so small buckets do not pay one round trip each."""
    handles = [dp_comm.all_gather(shard, async_op=True) for shard in shards]
    return [handle.wait() for handle in handles]

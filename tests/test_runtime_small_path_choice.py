"""Which path a same-host collective takes depends only on what every rank shares (dtype, size, op,
group), never on one rank's array layout or writability: ranks then agree bit for bit."""
import numpy as np
import pytest

from ringpipe.runtime.shm_wait import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("c") is not None, reason=f"no C helper: {unavailable_reason('c')}")


def reduce_mixed_zeros_one_rank_strided(comm, op):
    comm.barrier()  # opens the channel: what follows may take the latency path
    zeros = np.array([0.0, -0.0] * 4 if comm.rank % 2 == 0 else [-0.0, 0.0] * 4, np.float32)
    x = np.repeat(zeros, 2)[::2] if comm.rank == 1 else zeros.copy()  # rank 1: not contiguous
    comm.all_reduce(x, op=op)
    root = np.arange(4.0)[::2] if comm.rank == 0 else np.zeros(2)  # the root's payload: strided
    out = np.empty(4)[::2] if comm.rank == 1 else np.zeros(2)  # a receiver's: strided too
    comm.broadcast(root if comm.rank == 0 else out, src=0)
    return np.signbit(x).tolist(), (root if comm.rank == 0 else out).tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["max", "min"])
def test_ranks_agree_bitwise_when_one_rank_reduces_a_non_contiguous_array(local_cluster, op):
    results = local_cluster(2).run(reduce_mixed_zeros_one_rank_strided, op)
    assert all(signs == results[0][0] for signs, _ in results)
    assert all(values == [0.0, 2.0] for _, values in results)

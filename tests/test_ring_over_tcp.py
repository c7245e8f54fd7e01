"""The ring all-reduce as it runs between hosts: every chunk an inline ZeroMQ message (no shared
memory), chunks large enough to leave without a copy, many of them in flight at once."""
import numpy as np

from ringpipe.runtime.messages import ZERO_COPY_BYTES

CHUNK = ZERO_COPY_BYTES  # the smallest chunk that is sent without a copy (and tracked)
LENGTH = 3 * 5 * CHUNK // 4 + 17  # float32: five chunks per rank's segment, and a ragged end


def base() -> np.ndarray:
    return (np.arange(LENGTH) % 97).astype(np.float32)


def reduce_twice_over_tcp(comm):
    comm = comm.using(shm=False, algorithm="ring", chunk_bytes=CHUNK)
    x = base() * (comm.rank + 1)
    comm.all_reduce(x)
    first = x.copy()
    comm.all_reduce(x)  # the same buffer at once: no send of the first call may still read it
    return first, x


def test_a_ring_all_reduce_with_zero_copy_chunks_in_flight_sums_exactly_and_leaves_its_buffer_free(local_cluster):
    for first, second in local_cluster(3).run(reduce_twice_over_tcp):
        np.testing.assert_array_equal(first, base() * 6)
        np.testing.assert_array_equal(second, base() * 18)

"""Collectives and point-to-point against NumPy references, on real local worker processes."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALGORITHMS = ["direct", "ring", "shm"]
DTYPES = ["float64", "float32", "int64", "int32", "float16"]


def rank_data(rank, length, dtype, salt=0):
    """Deterministic per-rank input; small integers so every dtype sums exactly."""
    values = (np.arange(length) * 7 + rank * 13 + salt) % 11 - 5
    return values.astype(dtype)


def reference(op, arrays):
    stacked = np.stack([a.astype(np.float64) for a in arrays])
    return {"sum": stacked.sum(0), "avg": stacked.mean(0), "max": stacked.max(0), "min": stacked.min(0)}[op]


def do_all_reduce(comm, length, dtype, op, algorithm, strided):
    comm = comm.using(algorithm=algorithm)
    x = rank_data(comm.rank, length * (2 if strided else 1), dtype)
    if strided:
        x = x[::2]  # non-contiguous input
    comm.all_reduce(x, op=op)
    return x


def do_all_gather(comm, shape, dtype, algorithm):
    comm = comm.using(algorithm=algorithm)
    x = rank_data(comm.rank, int(np.prod(shape)), dtype).reshape(shape)
    return comm.all_gather(x)


def do_reduce_scatter(comm, rows, dtype, op, algorithm):
    comm = comm.using(algorithm=algorithm)
    x = rank_data(comm.rank, rows * comm.size * 3, dtype).reshape(rows * comm.size, 3)
    return comm.reduce_scatter(x, op=op)


def do_broadcast(comm, length, dtype, root, algorithm):
    comm = comm.using(algorithm=algorithm)
    x = rank_data(comm.rank, length, dtype)
    comm.broadcast(x, src=root)
    return x


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_reduce_matches_numpy_for_every_world_size(local_cluster, world_size, algorithm):
    cluster = local_cluster(world_size)
    for length, dtype, op, strided in [(1001, "float64", "sum", False), (7, "int32", "max", True),
                                       (0, "float32", "sum", False), (300_000, "float32", "avg", False),
                                       (513, "float16", "min", True), (5, "int64", "sum", False)]:
        results = cluster.run(do_all_reduce, length, dtype, op, algorithm, strided)
        inputs = [rank_data(r, length * (2 if strided else 1), dtype)[:: 2 if strided else 1]
                  for r in range(world_size)]
        expected = reference(op, inputs)
        for result in results:
            assert result.dtype == np.dtype(dtype) and result.shape == (length,)
            np.testing.assert_allclose(result.astype(np.float64), expected, rtol=1e-6)
        # Every rank holds bitwise the same values.
        assert all(np.array_equal(r, results[0]) for r in results)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_gather_concatenates_along_axis_0(local_cluster, world_size, algorithm):
    cluster = local_cluster(world_size)
    for shape, dtype in [((3, 4), "float32"), ((0,), "int64"), ((), "float64"), ((40_000,), "float64")]:
        results = cluster.run(do_all_gather, shape, dtype, algorithm)
        pieces = [rank_data(r, int(np.prod(shape)), dtype).reshape(shape) for r in range(world_size)]
        expected = np.concatenate([p.reshape(-1, *shape[1:]) if p.ndim else p.reshape(1) for p in pieces])
        for result in results:
            np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("world_size", [1, 2, 4, 5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reduce_scatter_returns_this_ranks_slice(local_cluster, world_size, algorithm):
    cluster = local_cluster(world_size)
    for rows, dtype, op in [(2, "float64", "sum"), (1, "int32", "max"), (5000, "float32", "sum")]:
        results = cluster.run(do_reduce_scatter, rows, dtype, op, algorithm)
        inputs = [rank_data(r, rows * world_size * 3, dtype).reshape(rows * world_size, 3) for r in range(world_size)]
        full = reference(op, inputs)
        for rank, result in enumerate(results):
            np.testing.assert_allclose(result.astype(np.float64), full[rank * rows:(rank + 1) * rows], rtol=1e-6)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_broadcast_copies_the_root(local_cluster, world_size, algorithm):
    cluster = local_cluster(world_size)
    for length, root in [(10, 0), (200_000, world_size - 1)]:
        results = cluster.run(do_broadcast, length, "float32", root, algorithm)
        for result in results:
            np.testing.assert_array_equal(result, rank_data(root, length, "float32"))


def reduce_scatter_indivisible(comm):
    try:
        comm.reduce_scatter(np.zeros(comm.size + 1))
    except ValueError as exc:
        return str(exc)


def test_reduce_scatter_rejects_indivisible_length(local_cluster):
    messages = local_cluster(3).run(reduce_scatter_indivisible)
    assert all("divisible by the group size 3" in m for m in messages)


def do_mixed(comm, seed):
    rng = np.random.default_rng([seed, comm.rank])
    x = rng.standard_normal(int(seed % 5000)).astype(np.float64)
    y = x.copy()
    comm.all_reduce(y)
    return x, y


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_all_reduce_property_random_lengths(local_cluster, seed):
    results = local_cluster(3).run(do_mixed, seed)
    expected = sum(x for x, _ in results)
    for _, y in results:
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(0, 3000), dtype=st.sampled_from(DTYPES), op=st.sampled_from(["sum", "max", "min"]),
       algorithm=st.sampled_from(ALGORITHMS))
def test_all_reduce_property_dtypes_and_algorithms(local_cluster, length, dtype, op, algorithm):
    results = local_cluster(4).run(do_all_reduce, length, dtype, op, algorithm, False)
    expected = reference(op, [rank_data(r, length, dtype) for r in range(4)])
    for result in results:
        np.testing.assert_allclose(result.astype(np.float64), expected, rtol=1e-3 if dtype == "float16" else 0)


# ---- point-to-point ------------------------------------------------------------------------------
def p2p_order_and_tags(comm):
    if comm.rank == 0:
        handles = []
        for i in range(10):
            handles.append(comm.isend(np.full(3, i, np.int64), 1, tag=1))
            handles.append(comm.isend(np.full(100_000, -i, np.float32), 1, tag=2))  # shm-sized payload
        for h in handles:
            h.wait()
        return None
    tag2 = [int(comm.recv(0, tag=2)[0]) for _ in range(10)]
    tag1 = [int(comm.recv(0, tag=1)[0]) for _ in range(10)]
    return tag1, tag2


def test_p2p_keeps_order_per_tag_and_tags_never_mix(local_cluster):
    _, (tag1, tag2) = local_cluster(2).run(p2p_order_and_tags)
    assert tag1 == list(range(10))
    assert tag2 == [-i for i in range(10)]


def p2p_ring_with_out(comm):
    out = np.empty((4, 5), np.float64)
    handle = comm.irecv((comm.rank - 1) % comm.size, out=out)
    comm.send(np.full((4, 5), comm.rank, np.float64), (comm.rank + 1) % comm.size)
    result = handle.wait()
    return result is out, float(out[0, 0]), handle.is_done()


def test_irecv_fills_out_and_reports_done(local_cluster):
    results = local_cluster(3).run(p2p_ring_with_out)
    assert results == [[True, 2.0, True], [True, 0.0, True], [True, 1.0, True]]


# ---- groups and async ----------------------------------------------------------------------------
def two_groups_at_once(comm):
    low = comm.new_group([0, 1])
    high = comm.new_group([2, 3])
    mine = low or high
    overlapping = comm.new_group([1, 2, 3])
    x = np.full(50_000, comm.rank + 1.0)
    handle = mine.all_reduce(x, async_op=True)
    y = np.full(10, comm.rank + 1.0)
    if overlapping is not None:
        overlapping.all_reduce(y)
    handle.wait()
    return mine.rank, mine.size, float(x[0]), float(y[0]), overlapping is None


def test_subgroups_run_concurrently_without_interfering(local_cluster):
    results = local_cluster(4).run(two_groups_at_once)
    assert results == [[0, 2, 3.0, 1.0, True], [1, 2, 3.0, 9.0, False], [0, 2, 7.0, 9.0, False],
                       [1, 2, 7.0, 9.0, False]]


def async_overlap(comm):
    import time

    x = np.ones(4_000_000, np.float32)
    start = time.perf_counter()
    handle = comm.all_reduce(x, async_op=True)
    issued = time.perf_counter() - start
    a = np.random.default_rng(0).standard_normal((300, 300))
    for _ in range(5):
        a = a @ a / 300.0  # compute while the all-reduce runs on the engine thread
    handle.wait()
    return issued, float(x[0]), handle.is_done()


def test_async_collective_returns_immediately_and_completes(local_cluster):
    results = local_cluster(2).run(async_overlap)
    for issued, value, done in results:
        assert issued < 0.05 and value == 2.0 and done


def cupy_all_reduce(comm):
    import cupy

    x = cupy.full(10, comm.rank + 1.0)
    comm.all_reduce(x)
    return type(x).__module__, float(x[0].get())


def test_cupy_arrays_stay_on_the_device(local_cluster):
    pytest.importorskip("cupy")
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("no CUDA device")
    results = local_cluster(2).run(cupy_all_reduce)
    assert all(m.startswith("cupy") and v == 3.0 for m, v in results)


def test_everything_also_works_over_tcp_alone(local_cluster):
    """With shared memory off, the same-host data path is ZeroMQ over TCP (as across hosts)."""
    cluster = local_cluster(3, shm=False)
    _, (tag1, tag2), _ = cluster.run(p2p_order_and_tags_three)
    assert tag1 == list(range(10)) and tag2 == [-i for i in range(10)]
    for algorithm in ALGORITHMS:
        results = cluster.run(do_all_reduce, 200_001, "float32", "sum", algorithm, False)
        expected = reference("sum", [rank_data(r, 200_001, "float32") for r in range(3)])
        for result in results:
            np.testing.assert_allclose(result, expected, rtol=1e-6)


def p2p_order_and_tags_three(comm):
    return p2p_order_and_tags(comm) if comm.rank < 2 else None

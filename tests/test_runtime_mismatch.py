"""Disagreements between ranks raise on every rank, whatever the collective, algorithm and size;
output buffers are never cast into."""
import numpy as np
import pytest

from tests.conftest import arena_blocks_in_use
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORLD = 3
KINDS = {"all_reduce": ["op", "shape", "dtype"], "reduce_scatter": ["op", "shape", "dtype"],
         "all_gather": ["shape", "dtype"], "broadcast": ["shape", "dtype", "root"]}


@pytest.fixture(scope="module")
def three_ranks(local_cluster_pool):
    """One cluster for every example of the property test (starting one costs seconds)."""
    return local_cluster_pool.get(WORLD)


def disagreeing_collective(comm, kind, algorithm, size, what, bad_rank):
    """Run `kind` with every rank agreeing except `bad_rank`, which differs in `what`; returns the
    error's type name ('no error' when it returned)."""
    comm = comm.using(algorithm=algorithm)
    bad = comm.rank == bad_rank
    dtype = np.float32 if what == "dtype" and bad else np.float64
    length = size + 1 if what == "shape" and bad else size
    op = "max" if what == "op" and bad else "sum"
    root = comm.size - 1 if what == "root" and bad else 0
    x = np.full(length, comm.rank + 1.0, dtype)
    try:
        if kind == "all_reduce":
            comm.all_reduce(x, op=op, timeout=10)
        elif kind == "reduce_scatter":
            comm.reduce_scatter(np.full((comm.size, length), comm.rank + 1.0, dtype), op=op, timeout=10)
        elif kind == "all_gather":
            comm.all_gather(x, timeout=10)
        else:
            comm.broadcast(x, src=root, timeout=10)
    except Exception as exc:  # noqa: BLE001 - the test looks at which error it was
        return type(exc).__name__
    return "no error"


def test_ring_all_reduce_of_fewer_elements_than_ranks_detects_an_op_mismatch(three_ranks):
    # The reported case: one element, three ranks, rank 1 asks for max while the others sum.
    results = three_ranks.run(disagreeing_collective, "all_reduce", "ring", 1, "op", 1, timeout=60)
    assert results == ["CollectiveMismatch"] * WORLD


@st.composite
def disagreements(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    return (kind, draw(st.sampled_from(["direct", "ring", "shm"])), draw(st.integers(0, 2 * WORLD)),
            draw(st.sampled_from(KINDS[kind])), draw(st.integers(0, WORLD - 1)))


@pytest.mark.timeout(240)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=disagreements())
def test_any_disagreement_raises_collective_mismatch_on_every_rank(three_ranks, case):
    """Every collective, algorithm and size from empty to 2 x world (some ranks own no chunk),
    with the op, shape, dtype or root differing on one rank."""
    results = three_ranks.run(disagreeing_collective, *case, timeout=60)
    assert results == ["CollectiveMismatch"] * WORLD, case


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_shape_mismatch_across_the_direct_shared_memory_boundary_raises_on_every_rank(three_ranks, kind):
    # 4096 float64 = 32 KiB picks direct, one element more picks shared memory: the ranks run
    # different algorithms, and still every one of them notices.
    bad = three_ranks.run(disagreeing_collective, kind, "auto", 4096, "shape", 1, timeout=60)
    assert bad == ["CollectiveMismatch"] * WORLD


# ---- output buffers ----------------------------------------------------------------------------
def receive_into(comm, out_dtype, out_shape, blocking, length):
    if comm.rank == 0:
        comm.send(np.linspace(-1.9, 1e10, length), 1, timeout=10)  # float64
        return "sent"
    out = np.zeros(out_shape, out_dtype)
    try:
        if blocking:
            comm.recv(0, out=out, timeout=10)
        else:
            comm.irecv(0, out=out, timeout=10).wait()
    except ValueError as exc:
        return str(exc)
    return out.tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("length", [4, 100_000])  # inline and through shared memory
@pytest.mark.parametrize("blocking", [True, False])
def test_receiving_into_a_buffer_of_another_dtype_raises_naming_both(local_cluster, blocking, length):
    sent, message = local_cluster(2).run(receive_into, "int32", (length,), blocking, length, timeout=30)
    assert sent == "sent"  # the sender finished: its data was delivered
    assert "recv from rank 0" in message and "int32" in message and "float64" in message


@pytest.mark.timeout(60)
def test_receiving_into_a_buffer_of_another_shape_raises_naming_both(local_cluster):
    sent, message = local_cluster(2).run(receive_into, "float64", (5,), True, 4, timeout=30)
    assert sent == "sent" and "(5,)" in message and "(4,)" in message


@pytest.mark.timeout(60)
def test_receiving_into_a_matching_buffer_fills_it(local_cluster):
    sent, values = local_cluster(2).run(receive_into, "float64", (4,), True, 4, timeout=30)
    assert values == np.linspace(-1.9, 1e10, 4).tolist()


@pytest.mark.timeout(60)
def test_a_refused_receive_gives_the_senders_shared_memory_back(local_cluster):
    cluster = local_cluster(2)
    cluster.run(receive_into, "int32", (100_000,), True, 100_000, timeout=30)
    assert cluster.run(arena_blocks_in_use) == [0, 0]

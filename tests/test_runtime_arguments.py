"""A bad argument to a communicator operation raises on its rank before the operation is numbered,
so the group's later collectives stay in step (runtime/arguments.py)."""
import numpy as np
import pytest

from ringpipe.runtime import RemoteError

BAD_ARGUMENTS = {
    "read-only all_reduce": lambda comm: comm.all_reduce(np.frombuffer(b"\0" * 16, np.float32)),
    "list all_reduce": lambda comm: comm.all_reduce([1.0, 2.0]),
    "float broadcast": lambda comm: comm.broadcast(1.5),
    "read-only broadcast": lambda comm: comm.broadcast(np.frombuffer(b"\0" * 16, np.float32)),
    "structured all_reduce": lambda comm: comm.all_reduce(np.zeros(2, [("a", "f4"), ("b", "i4")])),
    "datetime all_gather": lambda comm: comm.all_gather(np.zeros(2, "datetime64[s]")),
    "object reduce_scatter": lambda comm: comm.reduce_scatter(np.array([1, "a"], dtype=object)),
    "prod all_reduce": lambda comm: comm.all_reduce(np.ones(3), op="prod"),
    "zero timeout barrier": lambda comm: comm.barrier(timeout=0),
    "read-only recv out": lambda comm: comm.recv(1 - comm.rank, out=np.frombuffer(b"\0" * 16, np.float32)),
    "string send": lambda comm: comm.send(np.array(["a"]), 1 - comm.rank),
}


def every_bad_argument_then_a_sum(comm):
    errors = {}
    for name, call in BAD_ARGUMENTS.items():
        try:
            call(comm)
            errors[name] = "no error"
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    x = np.full(4, comm.rank + 1.0, np.float32)  # the same shape and dtype as the read-only ones
    comm.all_reduce(x)
    return errors, x.tolist()


@pytest.mark.timeout(60)
def test_a_bad_argument_raises_one_line_naming_op_rank_and_why_and_later_collectives_stay_in_step(local_cluster):
    results = local_cluster(2).run(every_bad_argument_then_a_sum)
    for rank, (errors, total) in enumerate(results):
        assert total == [3.0] * 4
        for name, error in errors.items():
            operation = name.split()[-1] if not name.endswith("out") else "recv"
            assert error.startswith(("TypeError: ", "ValueError: ")) and "\n" not in error, (name, error)
            assert f"{operation}: rank {rank}'s" in error, (name, error)
        assert "read-only" in errors["read-only all_reduce"] and "is a list" in errors["list all_reduce"]
        assert "not numeric" in errors["structured all_reduce"] and "'prod' is unknown" in errors["prod all_reduce"]
        assert "positive number of seconds, got 0" in errors["zero timeout barrier"]


def rank_1_passes_a_read_only_array(comm):
    x = np.ones(4, np.float32)
    if comm.rank == 1:
        x.flags.writeable = False
    comm.all_reduce(x, timeout=20)
    return x.tolist()


def one_sum(comm):
    x = np.ones(4, np.float32)
    comm.all_reduce(x)
    return x.tolist()


@pytest.mark.timeout(60)
def test_one_rank_with_a_bad_argument_fails_the_call_naming_it_and_the_next_call_runs(local_cluster):
    cluster = local_cluster(2)
    with pytest.raises(RemoteError, match=r"rank 1.*all_reduce: rank 1's x is read-only"):
        cluster.run(rank_1_passes_a_read_only_array)
    assert cluster.run(one_sum) == [[2.0] * 4] * 2


def wait_for_a_message_never_sent(comm, patience):
    if comm.rank == 1:
        return None
    handle = comm.irecv(1)
    try:
        handle.wait(timeout=patience)
    except Exception as exc:  # noqa: BLE001 - its message is the result
        return str(exc)
    return "no error"


@pytest.mark.timeout(60)
def test_a_handle_waited_for_with_its_own_timeout_names_that_timeout(local_cluster):
    error, _ = local_cluster(2).run(wait_for_a_message_never_sent, 0.5)  # the communicator waits 60 s
    assert "0.5s" in error and "60s" not in error

"""A call's communication stays in that call: what one call leaves behind (an operation nobody
waited for, a message nobody received) never matches anything in the next call."""
import numpy as np
import pytest

from tests.conftest import arena_blocks_in_use

COLLECTIVES = ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "barrier"]


def start_collective(comm, kind, value):
    """Start one collective of `kind` on `comm` without waiting for it."""
    x = np.full(comm.size * 4, float(value))
    if kind == "all_reduce":
        return comm.all_reduce(x, async_op=True)
    if kind == "all_gather":
        return comm.all_gather(x, async_op=True)
    if kind == "reduce_scatter":
        return comm.reduce_scatter(x, async_op=True)
    if kind == "broadcast":
        return comm.broadcast(x, src=comm.rank, async_op=True)
    return comm.barrier(async_op=True)


def run_collective(comm, kind, value):
    x = np.full(comm.size * 4, float(value))
    if kind == "all_reduce":
        return comm.all_reduce(x).tolist()
    if kind == "all_gather":
        return comm.all_gather(x).tolist()
    if kind == "reduce_scatter":
        return comm.reduce_scatter(x).tolist()
    if kind == "broadcast":
        return comm.broadcast(x, src=0).tolist()
    return comm.barrier()


class Leaver:
    """Holds handles from one call so a later call can wait on them."""

    def __init__(self, comm, group_ranks=None):
        self.comm = comm.new_group(group_ranks) if group_ranks is not None else comm
        self.handles = []

    def leave_collective_running(self, kind, algorithm, ranks):
        if self.comm is not None and self.comm.rank in ranks:
            self.handles.append(start_collective(self.comm.using(algorithm=algorithm), kind, 100.0))

    def collective(self, kind, algorithm):
        if self.comm is None:
            return None
        return run_collective(self.comm.using(algorithm=algorithm), kind, self.comm.rank + 1.0)

    def wait_left_handles(self):
        try:
            for handle in self.handles:
                handle.wait(timeout=10)
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            return f"{type(exc).__name__}: {exc}"
        return "completed" if self.handles else None

    def leave_send(self, tag):
        if self.comm.rank == 0:
            self.comm.isend(np.full(4, 100.0), 1, tag=tag)  # never received in this call
        if self.comm.rank == 2:
            self.comm.isend(np.full(200_000, 100.0), 1, tag=tag)  # large: through shared memory

    def leave_recv(self, tag):
        if self.comm.rank == 1:
            self.handles.append(self.comm.irecv(0, tag=tag))  # nothing is sent in this call

    def exchange(self, tag):
        if self.comm.rank == 0:
            self.comm.send(np.full(4, 7.0), 1, tag=tag)
        if self.comm.rank == 2:
            self.comm.send(np.full(200_000, 9.0), 1, tag=tag)
        if self.comm.rank == 1:
            return [float(self.comm.recv(0, tag=tag, timeout=10)[0]), float(self.comm.recv(2, tag=tag, timeout=10)[0])]
        return None


def expected(kind, size):
    # Every rank contributes rank + 1: the sum is size(size+1)/2.
    total = size * (size + 1) / 2
    return {"all_reduce": [total] * size * 4,
            "all_gather": [float(r + 1) for r in range(size) for _ in range(size * 4)],
            "reduce_scatter": [total] * 4,
            "broadcast": [1.0] * size * 4,
            "barrier": None}[kind]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algorithm", ["direct", "ring", "shm"])
@pytest.mark.parametrize("kind", COLLECTIVES)
def test_a_collective_left_running_in_one_call_does_not_match_the_next_calls(local_cluster, kind, algorithm):
    cluster = local_cluster(2)
    actors = cluster.spawn(Leaver)
    actors.leave_collective_running(kind, algorithm, [0]).result(timeout=30)  # rank 1 does nothing
    assert actors.collective(kind, algorithm).result(timeout=30) == [expected(kind, 2)] * 2


@pytest.mark.timeout(60)
def test_a_handle_left_running_fails_with_a_clear_error_when_waited_on_later(local_cluster):
    cluster = local_cluster(2)
    actors = cluster.spawn(Leaver)
    actors.leave_collective_running("all_reduce", "auto", [0]).result(timeout=30)
    message, nothing = actors.wait_left_handles().result(timeout=30)
    assert nothing is None
    assert message.startswith("Cancelled: all_reduce #0 on group w") and "cancelled on rank 0" in message
    assert "ended before it finished" in message and "wait()" in message


def two_sided_async(comm):
    handle = comm.all_reduce(np.ones(10), async_op=True)
    handle.wait()
    return comm.all_reduce(np.ones(3)).tolist()


@pytest.mark.timeout(60)
def test_a_collective_every_rank_waits_for_is_not_cancelled(local_cluster):
    assert local_cluster(2).run(two_sided_async, timeout=30) == [[2.0] * 3] * 2


@pytest.mark.timeout(60)
def test_a_collective_left_running_on_a_subgroup_does_not_match_the_next_calls(local_cluster):
    cluster = local_cluster(3)
    actors = cluster.spawn(Leaver, [1, 2])  # group members are ranks 1 and 2 (group ranks 0 and 1)
    actors.leave_collective_running("all_reduce", "auto", [0]).result(timeout=30)
    assert actors.collective("all_reduce", "auto").result(timeout=30) == [None, [3.0] * 8, [3.0] * 8]


@pytest.mark.timeout(60)
def test_a_message_nobody_received_in_one_call_is_not_received_in_the_next(local_cluster):
    cluster = local_cluster(3)
    actors = cluster.spawn(Leaver)
    actors.leave_send(5).result(timeout=30)
    assert actors.exchange(5).result(timeout=30) == [None, [7.0, 9.0], None]
    # The large message's shared-memory block went back to rank 2 although nobody read it.
    assert cluster.run(arena_blocks_in_use) == [0, 0, 0]


@pytest.mark.timeout(60)
def test_a_receive_left_posted_in_one_call_does_not_take_the_next_calls_message(local_cluster):
    cluster = local_cluster(3)
    actors = cluster.spawn(Leaver)
    actors.leave_recv(6).result(timeout=30)
    assert actors.exchange(6).result(timeout=30) == [None, [7.0, 9.0], None]
    assert "recv from rank 0 tag 6" in actors.wait_left_handles().result(timeout=30)[1]


def one_rank_leaves_early(comm):
    import time

    if comm.rank == 0:
        comm.all_reduce(np.ones(4), async_op=True)  # returns without waiting
        return None
    time.sleep(0.5)  # rank 0's call has ended by now, and its all_reduce was cancelled
    start = time.monotonic()
    try:
        comm.all_reduce(np.ones(4), timeout=30)
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return type(exc).__name__, str(exc), time.monotonic() - start
    return "no error", "", time.monotonic() - start


@pytest.mark.timeout(60)
def test_a_peer_waiting_for_a_collective_another_rank_left_behind_fails_at_once(local_cluster):
    _, (kind, message, elapsed) = local_cluster(2).run(one_rank_leaves_early, timeout=30)
    assert kind == "Aborted" and "cancelled on rank 0" in message and elapsed < 5.0




def test_two_threads_starting_an_epoch_at_once_number_its_collectives_from_0_without_a_repeat():
    """GroupState.next (runtime/group_state.py) takes no lock within an epoch (abort epoch, call):
    two threads that both find the last epoch's numbers still there start the new one once."""
    import threading
    from types import SimpleNamespace

    from ringpipe.runtime.group_state import GroupState

    state = GroupState(SimpleNamespace(call_soon=lambda fn: None), SimpleNamespace(gid="g", shm=False))
    both, looked = threading.Barrier(2, timeout=10), threading.local()

    class Epoch:
        """An epoch whose first comparison in each thread waits for the other thread's: both see
        the old epoch's numbers before either starts this one."""

        def __ne__(self, other):
            if other is self:
                return False
            if not getattr(looked, "once", False):
                looked.once = True
                both.wait()
            return True

    epoch, taken = Epoch(), []
    threads = [threading.Thread(target=lambda: taken.append(state.next(epoch))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    looked.once = True
    assert sorted(taken) == [0, 1] and state.next(epoch) == 2 and state.next((0, 2)) == 0

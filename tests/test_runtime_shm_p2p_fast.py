"""Same-host point-to-point's fast path (runtime/shm_p2p_fast.py, one call into C per blocking send
and receive) against the Python path it stands in for: the same bits, the same key matching, the
same errors; and `RINGPIPE_SHM_P2P_C=0` forcing the Python path."""
import os
import time

import numpy as np
import pytest

from ringpipe.runtime import Cluster
from ringpipe.runtime.calls import WorkerDied
from ringpipe.runtime.shm_p2p_fast import extension

@pytest.fixture(scope="module", params=["c", "python"])
def pair(request):
    if request.param == "c" and extension() is None:
        pytest.skip("the shm_p2p C extension cannot be built here (no compiler or no Python headers)")
    env = {"RINGPIPE_SHM_P2P_C": "0"} if request.param == "python" else {}
    with Cluster(2, threads_per_worker=1, env=env) as cluster:
        yield request.param, cluster


def payloads():
    """Messages of every kind a fast path could get wrong: dtypes, 0-d, a view that is not
    contiguous and one too large for a slot (both: the Python path)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(4096)
    return [base[:256].astype(np.float32), base[:7].astype(np.float64), np.arange(-8, 8, dtype=np.int8),
            (base[:6] * 1e6).astype(np.uint64), (base[:8] + 1j * base[8:16]), np.array(2.5), base[:12] > 0,
            base[:64].reshape(4, 4, 4), base[:100:2], np.tile(base, 8)]


def path_counts(comm):
    fast = comm.engine.rings.fast
    return None if fast is None else (fast.sent, fast.received)


def exchange_every_kind_twice(comm):
    """Rank 0 sends each payload three times; rank 1 receives without `out`, into `out`, and
    without again (the first message of a kind takes the Python path, which describes it)."""
    if comm.rank == 0:
        for x in payloads():
            for _ in range(3):
                comm.send(x, 1, tag=3)
        return None
    got = []
    for x in payloads():
        out = np.empty_like(x) if x.flags.c_contiguous else np.empty(x.shape, x.dtype)
        got.append([comm.recv(0, tag=3), comm.recv(0, tag=3, out=out), comm.recv(0, tag=3)])
        assert got[-1][1] is out
    return got


@pytest.mark.timeout(120)
def test_every_kind_of_message_arrives_bit_for_bit_on_either_path(pair):
    path, cluster = pair
    before = cluster.run(path_counts)
    got = cluster.run(exchange_every_kind_twice)[1]
    for x, copies in zip(payloads(), got):
        for y in copies:
            assert y.dtype == x.dtype and y.shape == x.shape
            assert np.ascontiguousarray(y).tobytes() == np.ascontiguousarray(x).tobytes()
    after = cluster.run(path_counts)
    if path == "python":
        assert after == [None, None]
    else:  # sent: the later messages of every contiguous kind that fits a slot (unless the ring
        # was full); received: every message, in its slot or in one arena block, from the first on
        assert after[0][0] - before[0][0] >= 8 and after[1][1] - before[1][1] == 3 * len(payloads())


def interleaved_tags(comm):
    if comm.rank == 0:
        for value, tag in [(1, 1), (2, 2), (3, 1), (4, 2), (5, 1), (6, 1)]:
            comm.send(np.full(4, value, np.float32), 1, tag=tag)
        return None
    early = comm.irecv(0, tag=1)  # posted first: the first message of tag 1 is its
    order = [comm.recv(0, tag=2), comm.recv(0, tag=1), comm.recv(0, tag=2), early.wait(), comm.recv(0, tag=1),
             comm.recv(0, tag=1)]
    return [int(a[0]) for a in order]


@pytest.mark.timeout(120)
def test_receives_match_their_tag_and_their_order_among_interleaved_tags(pair):
    for _ in range(2):  # the second time every kind is known: the fast path's turn
        assert cluster_run(pair, interleaved_tags)[1] == [2, 3, 4, 1, 5, 6]


def cluster_run(pair, fn, *args):
    return pair[1].run(fn, *args, timeout=60)


def leave_a_message(comm):
    if comm.rank == 0:
        comm.send(np.full(4, -1.0, np.float32), 1, tag=7)  # nobody receives it in this call


def receive_after_a_left_message(comm):
    if comm.rank == 0:
        comm.send(np.full(4, 9.0, np.float32), 1, tag=7)
        return None
    return float(comm.recv(0, tag=7)[0])


@pytest.mark.timeout(120)
def test_a_message_left_by_an_earlier_call_is_dropped_not_received(pair):
    cluster_run(pair, receive_after_a_left_message)  # every kind known
    cluster_run(pair, leave_a_message)
    assert cluster_run(pair, receive_after_a_left_message)[1] == 9.0


def wait_for_a_message_that_never_comes(comm):
    if comm.rank == 0:
        comm.send(np.zeros(4, np.float32), 1, tag=5)
        return None
    comm.recv(0, tag=5, out=np.empty(4, np.float32))  # the kind known: the next wait is the fast path's
    try:
        comm.recv(0, tag=5, out=np.empty(4, np.float32), timeout=0.3)
    except TimeoutError as exc:
        return str(exc)


@pytest.mark.timeout(120)
def test_a_receive_that_times_out_names_operation_rank_and_peer(pair):
    message = cluster_run(pair, wait_for_a_message_that_never_comes)[1]
    assert message == ("recv from rank 0 tag 5 on group w on rank 1 timed out after 0.3s waiting for a message "
                       "from rank 0")


def fail_while_the_peer_waits(comm, path):
    if comm.rank == 0:
        comm.send(np.zeros(4, np.float32), 1, tag=6)
        time.sleep(0.3)  # (the peer is most likely waiting by now; either way it must see Aborted)
        raise ValueError("rank 0 gives up")
    try:
        comm.recv(0, tag=6, out=np.empty(4, np.float32))
        comm.recv(0, tag=6, out=np.empty(4, np.float32), timeout=30)
    except Exception as exc:  # noqa: BLE001 - what the waiter saw, for the test to read
        with open(path, "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")


@pytest.mark.timeout(120)
def test_a_waiting_receive_wakes_with_one_line_aborted_when_its_peer_fails(pair, tmp_path):
    path = tmp_path / "seen"
    with pytest.raises(Exception, match="rank 0 gives up"):
        cluster_run(pair, fail_while_the_peer_waits, str(path))
    for _ in range(100):  # the waiter writes once the abort reached it (within a sleep slice)
        if path.exists() and path.read_text():
            break
        time.sleep(0.1)
    seen = path.read_text()
    assert seen.startswith("Aborted: ") and "\n" not in seen and "rank 0" in seen


def die_while_the_peer_waits(comm):
    if comm.rank == 0:
        comm.send(np.zeros(4, np.float32), 1, tag=8)
        time.sleep(0.3)
        os._exit(3)
    comm.recv(0, tag=8, out=np.empty(4, np.float32))
    comm.recv(0, tag=8, out=np.empty(4, np.float32), timeout=30)  # rank 0 dies meanwhile


@pytest.mark.timeout(120)
def test_a_peer_that_dies_while_a_receive_waits_is_reported_at_once_naming_it(tmp_path):
    if extension() is None:
        pytest.skip("the shm_p2p C extension cannot be built here (no compiler or no Python headers)")
    cluster = Cluster(2, threads_per_worker=1)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerDied, match="worker rank 0 .* exited with code 3") as info:
            cluster.run(die_while_the_peer_waits, timeout=60)
        assert time.monotonic() - start < 20 and "\n" not in str(info.value).strip()  # not the receive's 30 s
    finally:
        cluster.close()


def two_threads_receive_two_tags(comm):
    """Rank 0 interleaves tags 1 and 2; on rank 1 a thread per tag receives its own in order."""
    import threading

    count = 200
    if comm.rank == 0:
        for i in range(count):
            comm.send(np.full(3, i, np.int64), 1, tag=1)
            comm.send(np.full(3, -i, np.int64), 1, tag=2)
        return None
    got = {1: [], 2: []}

    def receive(tag):
        out = np.empty(3, np.int64)
        for _ in range(count):
            got[tag].append(int(comm.recv(0, tag=tag, out=out)[0]))

    threads = [threading.Thread(target=receive, args=(tag,)) for tag in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got


@pytest.mark.timeout(120)
def test_threads_receiving_different_tags_each_get_their_own_messages_in_order(pair):
    got = cluster_run(pair, two_threads_receive_two_tags)[1]
    assert got == {1: list(range(200)), 2: [-i for i in range(200)]}

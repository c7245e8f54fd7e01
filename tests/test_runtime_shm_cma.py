"""Single-copy collectives between same-host processes (runtime/cma.py, runtime/shm_cma.py): peers
read each other's arrays with one cross-memory copy, with bitwise the arena path's results; a group
where any member cannot (or will not) read that way keeps to the arena path. And cma.py's one probe,
which these collectives and `sendrecv` (runtime/shm_p2p_single_copy.py) both ask."""
import ast
import ctypes
import errno
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ringpipe.runtime import cma, shm_cma, shm_p2p_single_copy

pytestmark = pytest.mark.skipif(not cma.available(), reason="no process_vm_readv in this libc")

ARENA = 2 << 20  # channel buffers of 128 KiB: the larger cases below go in several rounds
# (kind, dtype, elements per rank, layout, reduction): odd sizes, every dtype the path takes, strided
# inputs (the communicator copies them; the single-copy path reads the copy's address).
CASES = [("all_reduce", "float32", 70_003, "contiguous", "sum"), ("all_reduce", "float64", 40_001, "strided", "avg"),
         ("all_reduce", "int64", 20_001, "contiguous", "sum"), ("all_reduce", "float32", 30_001, "contiguous", "max"),
         ("all_reduce", "float16", 20_001, "contiguous", "sum"),
         ("reduce_scatter", "float32", 20_001, "contiguous", "sum"), ("reduce_scatter", "int32", 10_001, "strided", "min"),
         ("reduce_scatter", "float64", 12_345, "contiguous", "avg"),
         ("all_gather", "float32", 15_001, "strided", None), ("all_gather", "uint8", 30_001, "contiguous", None),
         ("broadcast", "float64", 40_001, "contiguous", None), ("broadcast", "int16", 30_001, "strided", None),
         ("all_reduce async", "float32", 50_001, "contiguous", "sum")]  # on the channel's thread


def run_cases(comm, group):
    out = []
    for index, (kind, dtype, count, layout, op) in enumerate(CASES):
        rng = np.random.default_rng(100 * index + comm.rank)
        size = count * group.size if kind == "reduce_scatter" else count
        base = (rng.standard_normal(2 * size) * 100).astype(dtype)
        x = base[::2] if layout == "strided" else base[:size].copy()
        if kind == "all_reduce":
            result = group.all_reduce(x, op=op)
        elif kind == "all_reduce async":
            result = group.all_reduce(x, op=op, async_op=True).wait()
        elif kind == "reduce_scatter":
            result = group.reduce_scatter(x, op=op)
        elif kind == "all_gather":
            result = group.all_gather(x)
        else:
            result = group.broadcast(x, src=group.size - 1)
        out.append(np.array(result, copy=True))
    return out


def with_thresholds(value, run):
    """`run()` with every operation's MIN_READ_BYTES at `value` (0: single-copy at every size and
    group size; None: never), alike on every member."""
    saved, most, pipelined = dict(shm_cma.MIN_READ_BYTES), dict(shm_cma.MAX_RANKS), set(shm_cma.PIPELINED)
    shm_cma.MIN_READ_BYTES.update(dict.fromkeys(saved, value))
    shm_cma.MAX_RANKS.clear()
    shm_cma.PIPELINED.clear()
    try:
        return run()
    finally:
        shm_cma.MIN_READ_BYTES.update(saved)
        shm_cma.MAX_RANKS.update(most)
        shm_cma.PIPELINED.update(pipelined)


def single_copy_and_arena(comm):
    """Every case on groups of 2, 3 and 4 ranks (one cluster), once single-copy and once on the
    arena path of the same channel; {n: (results, results, the channel's single-copy state)}."""
    groups = {2: comm.new_group([0, 1]), 3: comm.new_group([0, 1, 2]), 4: comm}
    out = {}
    for n, group in groups.items():
        if group is None:
            continue
        group.barrier()
        fast = with_thresholds(0, lambda: run_cases(comm, group))
        slow = with_thresholds(None, lambda: run_cases(comm, group))
        out[n] = (fast, slow, type(comm.engine.channels[group.group.gid].single_copy).__name__)
    return out


@pytest.mark.timeout(180)
def test_every_single_copy_collective_matches_the_arena_path_bitwise_at_2_3_and_4_ranks(local_cluster):
    results = local_cluster(4, arena_bytes=ARENA).run(single_copy_and_arena)
    for n in (2, 3, 4):
        for rank in range(n):
            fast, slow, state = results[rank][n]
            assert state == "SingleCopy", (n, rank)
            for case, got, want in zip(CASES, fast, slow):
                assert got.dtype == want.dtype and got.shape == want.shape, (n, case, rank)
                assert got.tobytes() == want.tobytes(), (n, case, rank)
    for index, (kind, dtype, count, layout, op) in enumerate(CASES):  # and the arena path is right
        if kind == "all_reduce" and op == "sum" and dtype != "float16":
            inputs = []
            for rank in range(4):
                base = (np.random.default_rng(100 * index + rank).standard_normal(2 * count) * 100).astype(dtype)
                inputs.append(base[::2] if layout == "strided" else base[:count])
            total = inputs[0] + inputs[1]
            for x in inputs[2:]:
                total = total + x
            assert results[0][4][1][index].tobytes() == total.tobytes(), (kind, dtype)


def one_member_votes_no(comm):
    """A 3-rank group whose rank 2 will not read single-copy (as under a strict ptrace_scope): an
    all_reduce and a broadcast that would take the path, and the channel's state after."""
    group = comm.new_group([0, 1, 2])
    if group is None:
        return None
    group.barrier()
    if comm.rank == 2:
        cma.set_mode("off")
    try:
        x = np.arange(50_001, dtype=np.float32) * (comm.rank + 1)
        y = np.arange(30_001, dtype=np.float64) * (comm.rank + 1)
        with_thresholds(0, lambda: (group.all_reduce(x), group.broadcast(y, src=0)))
    finally:
        cma.set_mode("on")
    return x, y, comm.engine.channels[group.group.gid].single_copy


@pytest.mark.timeout(120)
def test_one_members_no_at_the_probe_keeps_every_member_on_the_arena_path(local_cluster):
    results = local_cluster(4, arena_bytes=ARENA).run(one_member_votes_no)
    for rank in range(3):
        x, y, state = results[rank]
        assert state is False, rank
        assert np.array_equal(x, np.arange(50_001, dtype=np.float32) * 6)
        assert np.array_equal(y, np.arange(30_001, dtype=np.float64))


# ---- the cross-memory read -----------------------------------------------------------------------
def test_a_read_copies_another_processs_array_and_names_the_pid_once_it_has_exited():
    array = np.arange(300_001, dtype=np.float64)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the peer: keeps its copy of `array` (copy-on-write) until killed
        os.write(ready_w, b"x")
        time.sleep(60)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        out = np.empty_like(array)
        array[:] = -1  # only this process's copy changes
        cma.read(pid, array.ctypes.data, array.nbytes, out.ctypes.data)
        assert np.array_equal(out, np.arange(300_001, dtype=np.float64))
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
    with pytest.raises(OSError) as raised:
        cma.read(pid, array.ctypes.data, 8, ctypes.addressof(ctypes.c_uint64()))
    assert raised.value.errno == errno.ESRCH and f"pid {pid}" in str(raised.value)


# ---- a peer that dies mid-collective ---------------------------------------------------------------
def root_dies_after_publishing(comm):
    """A broadcast from rank 1 (single-copy at any size, for the test), which exits once every
    member has seen where its array lies; the others read only after it is gone."""
    comm.barrier()
    shm_cma.MIN_READ_BYTES["broadcast"] = 0
    if comm.rank == 1:
        begin = shm_cma.begin

        def begin_then_die(channel, array):
            begin(channel, array)
            os._exit(3)

        shm_cma.begin = begin_then_die
    else:
        read = shm_cma._read

        def read_once_gone(channel, peer, *args):
            pid = channel.single_copy.pids[peer]
            while _alive(pid):
                time.sleep(0.01)
            return read(channel, peer, *args)

        shm_cma._read = read_once_gone
    comm.broadcast(np.zeros(100_000, np.float32), src=1, timeout=600)


def _alive(pid: int) -> bool:
    """False once `pid` has exited (a zombie has no memory left to read)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_a_peer_that_dies_mid_collective_ends_the_call_on_every_rank_without_a_hang():
    from ringpipe.runtime import Cluster, RemoteError, WorkerLost

    with Cluster(3) as cluster:
        start = time.monotonic()
        with pytest.raises((WorkerLost, RemoteError)):  # WorkerDied, or the driver's socket to it failing
            cluster.run(root_dies_after_publishing, timeout=120)
        assert time.monotonic() - start < 100.0  # far below the collective's 600 s timeout, even at a load of 12


def read_from_a_gone_peer(comm):
    """A broadcast from rank 1 of a 3-rank group whose readers find rank 1's process gone (its pid
    swapped for one that has exited: what a crash between publish and read leaves): each reader's
    error, as it reads it; the root gives up waiting, or hears the readers closed the group."""
    group = comm.new_group([0, 1, 2])
    if group is None:
        return None
    group.barrier()
    channel = comm.engine.channels[group.group.gid]
    x = np.zeros(100_000, np.float32)
    try:
        with_thresholds(0, lambda: group.broadcast(x, src=1, timeout=60))  # probes: every member reads
        if comm.rank != 1:
            child = os.fork()
            if child == 0:
                os._exit(0)
            os.waitpid(child, 0)
            channel.single_copy.pids[1] = child
        with_thresholds(0, lambda: group.broadcast(x, src=1, timeout=3 if comm.rank == 1 else 60))
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return str(exc)
    return None


@pytest.mark.timeout(120)
def test_a_read_from_a_peer_that_is_gone_is_a_one_line_error_naming_rank_and_peer(local_cluster):
    messages = local_cluster(4, arena_bytes=ARENA).run(read_from_a_gone_peer)
    for rank in (0, 2):
        assert "\n" not in messages[rank] and f"(rank {rank} of 3)" in messages[rank], messages[rank]
        assert "reading rank 1's array" in messages[rank] and "it has exited" in messages[rank], messages[rank]
    # The root waits for readers that gave up: it times out, or learns at once that they closed the group.
    assert "\n" not in messages[1] and "(rank 1 of 3)" in messages[1], messages[1]
    assert "timed out" in messages[1] or "destroyed group" in messages[1], messages[1]


def _drop_ptrace_capability():
    """Take CAP_SYS_PTRACE out of this process's capability sets (capset(2)), as an unprivileged
    user has none; False where that cannot be done."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        return False
    bit = 1 << 19  # CAP_SYS_PTRACE
    data[0].effective &= ~bit
    data[0].permitted &= ~bit
    return libc.capset(ctypes.byref(header), data) == 0


def _probe_answers(pid: int, address: int, nonce: int) -> tuple:
    """What each single-copy path answers about process `pid`'s probe word: (errno of a plain read
    of it, 0 when it read; cma.can_read; a collective's verdict on a 2-member channel whose peer
    published it; whether a `sendrecv` receiver reads a message that names it)."""
    try:
        cma.read(pid, address, 8, ctypes.addressof(ctypes.c_uint64()))
        code = 0
    except OSError as exc:
        code = exc.errno if f"pid {pid}" in str(exc) else str(exc)
    channel = SimpleNamespace(n=2, me=0, regions=[bytearray(4096), bytearray(4096)])
    state = shm_cma.SingleCopy(channel)
    state.words[1][shm_cma.PID], state.words[1][shm_cma.PROBE], state.words[1][shm_cma.NONCE] = pid, address, nonce
    receiver = shm_p2p_single_copy.SingleCopy()
    message = shm_p2p_single_copy.DESCRIPTOR.pack(pid, address, 8, address, nonce)  # the word as the payload
    return (code, cma.can_read(cma.Reader(), pid, address, nonce), state.verdict(channel),
            receiver.read(1, message, np.empty(8, np.uint8)))


def test_the_kernels_eperm_makes_every_single_copy_path_say_no_where_reading_itself_says_yes():
    """What a strict Yama ptrace_scope, another user or a non-dumpable peer gives (EPERM): the one
    probe says no, so a group's collectives vote no and a `sendrecv` receiver refuses (its sender
    then sends a copy); the same calls on a word this process may read say yes."""
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    owner = os.fork()
    if owner == 0:  # the peer: not dumpable, so only a process with CAP_SYS_PTRACE may read it
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
        os.write(ready_w, repr(cma.probe_word()).encode())
        time.sleep(60)
        os._exit(0)
    address, nonce = ast.literal_eval(os.read(ready_r, 100).decode())
    reader = os.fork()
    if reader == 0:
        answers = "?"
        if _drop_ptrace_capability():
            own_address, own_nonce = cma.probe_word()
            answers = repr([_probe_answers(owner, address, nonce), _probe_answers(os.getpid(), own_address, own_nonce),
                            cma.can_read(cma.Reader(), os.getpid(), own_address, own_nonce + 2)])
        os.write(result_w, answers.encode())
        os._exit(0)
    try:
        os.waitpid(reader, 0)
        got = os.read(result_r, 1000).decode()
    finally:
        os.kill(owner, 9)
        os.waitpid(owner, 0)
        for fd in (ready_r, ready_w, result_r, result_w):
            os.close(fd)
    if got == "?":
        pytest.skip("cannot drop CAP_SYS_PTRACE here")
    refused, allowed, other_nonce = ast.literal_eval(got)
    assert refused == (errno.EPERM, False, shm_cma.NO, False)
    assert allowed == (0, True, shm_cma.YES, True)
    assert other_nonce is False  # a word that holds another value: another process than the one published
    assert nonce != cma.probe_word()[1]  # a forked child draws its own nonce


def test_the_path_is_chosen_by_the_bytes_a_rank_reads_and_never_after_the_probe_said_no():
    def chosen(n, op, nbytes, state=None):
        return shm_cma.chosen(SimpleNamespace(n=n, single_copy=state), op, nbytes)

    least, cores = shm_cma.MIN_READ_BYTES["all_reduce"], shm_cma.HOST_CORES
    # an all_reduce pipelines on the arena while the members have a core each (shm_cma.PIPELINED)
    assert not chosen(cores, "all_reduce", 1 << 30) and chosen(cores + 1, "all_reduce", 1 << 30)
    assert chosen(max(4, cores + 1), "all_reduce", 2 * least)  # reads 3/4 (and more) of it ...
    assert not chosen(max(4, cores + 1), "all_reduce", least)  # ... of what it reads by the threshold
    assert chosen(2, "broadcast", 2 * least) and not chosen(4, "broadcast", 2 * least)  # per reader of the root's
    assert not chosen(4, "all_reduce", 1 << 30, state=False)
    assert chosen(2, "all_gather", 1 << 30) and not chosen(4, "all_gather", 1 << 30)  # saves 1 copy of n
    for op, path in shm_cma.MIN_READ_BYTES.items():
        assert chosen(max(2, cores + 1) if op in shm_cma.PIPELINED else 2, op, 1 << 30) == (path is not None), op


def test_ringpipe_cma_0_turns_every_single_copy_path_off_from_a_processs_start():
    import subprocess
    import sys

    script = ("from ringpipe.runtime import cma, shm_p2p_single_copy; "
              "print(cma.mode(), cma.wanted(), shm_p2p_single_copy.SingleCopy().on)")
    for value, want in (("0", "off False False"), ("1", "on True True")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "RINGPIPE_CMA": value})
        assert done.stdout.strip() == want, (value, done.stderr[-500:])


def test_set_mode_off_makes_this_process_say_no_and_other_modes_are_refused():
    try:
        cma.set_mode("off")
        assert (cma.mode(), cma.wanted(), shm_p2p_single_copy.SingleCopy().on) == ("off", False, False)
    finally:
        cma.set_mode("on")
    assert cma.wanted()
    with pytest.raises(ValueError, match="'maybe'"):
        cma.set_mode("maybe")

"""The NCCL communicator's wiring, on the CPU: a stand-in for NCCL, not NCCL.

What is tested here is ringpipe's own logic around NCCL: the unique id drawn on rank 0 and broadcast
over the real control plane (ZeroMQ worker processes), the dtype and reduction tables, the checks
made before anything is enqueued, the shape headers and ordering checks of point-to-point messages,
and the abort after a timeout. `FakeNccl` implements the few calls of `cupy.cuda.nccl` that the
communicator makes, on NumPy arrays addressed by pointer, moving data over the control communicator.
The real NCCL path (CuPy arrays, CUDA streams and events, NCCL kernels) is untested without a GPU:
tests/test_gpu.py runs it with a one-rank group, and multi-rank NCCL needs one GPU per rank (NCCL
refuses two ranks on one device), so it stays untested on a one-GPU machine.
"""
import ctypes

import numpy as np
import pytest

from ringpipe.runtime.engine import CommTimeout
from ringpipe.runtime.nccl_communicator import DATATYPES, REDUCTIONS, UNIQUE_ID_BYTES, NcclCommunicator, datatype, reduction

AVG = 4
DATA_TAG = 1 << 30  # the stand-in's own messages; NCCL's would not travel over the control plane


class FakeNccl:
    """The constants and calls of `cupy.cuda.nccl` that NcclCommunicator uses; collectives run over
    the control communicator the test hands in, on the host memory behind the pointers."""
    NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 9
    NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3

    def __init__(self, control, unique_id=None, with_avg=True):
        self.control, self.unique_id, self.calls, self.inits = control, unique_id, [], []
        if with_avg:  # NCCL before 2.10 has no NCCL_AVG
            self.NCCL_AVG = AVG

    def get_unique_id(self):
        self.calls.append("get_unique_id")
        return self.unique_id

    def NcclCommunicator(self, ndev, unique_id, rank):
        self.inits.append((ndev, unique_id, rank))
        return FakeComm(self)


_NAMES = {getattr(FakeNccl, constant): name for name, constant in DATATYPES.items()}
_OPS = {FakeNccl.NCCL_SUM: "sum", FakeNccl.NCCL_MAX: "max", FakeNccl.NCCL_MIN: "min", AVG: "avg"}


def at(pointer, count, code):
    dtype = np.dtype(_NAMES[code])
    return np.frombuffer((ctypes.c_byte * (count * dtype.itemsize)).from_address(pointer), dtype)


class FakeComm:
    def __init__(self, nccl):
        self.nccl, self.control, self.aborted = nccl, nccl.control, False

    def _log(self, *call):
        self.nccl.calls.append(call)

    def allReduce(self, send, recv, count, code, op, stream):
        self._log("allReduce", count, code, op)
        data = at(send, count, code).copy()
        self.control.all_reduce(data, op=_OPS[op])
        at(recv, count, code)[:] = data

    def reduceScatter(self, send, recv, count, code, op, stream):
        self._log("reduceScatter", count, code, op)
        at(recv, count, code)[:] = self.control.reduce_scatter(at(send, count * self.control.size, code).copy(),
                                                               op=_OPS[op])

    def allGather(self, send, recv, count, code, stream):
        self._log("allGather", count, code)
        at(recv, count * self.control.size, code)[:] = self.control.all_gather(at(send, count, code).copy())

    def broadcast(self, send, recv, count, code, root, stream):
        self._log("broadcast", count, code, root)
        data = at(send, count, code).copy()
        self.control.broadcast(data, src=root)
        at(recv, count, code)[:] = data

    def send(self, pointer, count, code, peer, stream):
        self._log("send", count, code, peer)
        self.control.send(at(pointer, count, code).copy(), peer, tag=DATA_TAG)

    def recv(self, pointer, count, code, peer, stream):
        self._log("recv", count, code, peer)
        at(pointer, count, code)[:] = self.control.recv(peer, tag=DATA_TAG)

    def check_async_error(self):
        pass

    def abort(self):
        self.aborted = True

    def destroy(self):
        pass


class Done:
    done = True


class HostArrays:
    """CudaArrays' calls on NumPy arrays: host pointers, no streams, events that have always passed."""
    event_type = Done

    def is_array(self, x):
        return isinstance(x, np.ndarray)

    def pointer(self, x):
        return x.ctypes.data

    def stream(self):
        return 0

    def event(self):
        return self.event_type()

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)


def unique_id_for(seed):
    return tuple(int(b) for b in np.random.default_rng(seed).integers(-128, 128, UNIQUE_ID_BYTES))


def nccl_over(control, with_avg=True):
    fake = FakeNccl(control, unique_id_for(7) if control.rank == 0 else None, with_avg)
    return NcclCommunicator(control, nccl=fake, arrays=HostArrays()), fake


# ---- the unique id ------------------------------------------------------------------------------------
def draw_and_exchange(control):
    fake = FakeNccl(control, unique_id_for(7) if control.rank == 0 else None)
    comm = NcclCommunicator(control, nccl=fake, arrays=HostArrays())
    return fake.calls, fake.inits, comm.rank, comm.size


@pytest.mark.timeout(60)
def test_rank_0_draws_the_unique_id_and_every_rank_inits_nccl_with_it(local_cluster):
    results = local_cluster(3).run(draw_and_exchange)
    for rank, (calls, inits, comm_rank, comm_size) in enumerate(results):
        assert calls == (["get_unique_id"] if rank == 0 else [])
        # signed bytes survive the control plane (results come back as lists)
        assert [(n, tuple(unique_id), r) for n, unique_id, r in inits] == [(3, unique_id_for(7), rank)]
        assert (comm_rank, comm_size) == (rank, 3)


# ---- the tables -----------------------------------------------------------------------------------------
def test_every_dtype_nccl_has_maps_to_its_constant_and_others_are_refused():
    for name, constant in DATATYPES.items():
        assert datatype(FakeNccl, np.dtype(name), "here") == getattr(FakeNccl, constant)
    for dtype in ("int16", "complex64", "bool"):
        with pytest.raises(TypeError, match=f"here: NCCL has no datatype for {dtype}"):
            datatype(FakeNccl, np.dtype(dtype), "here")


def test_reductions_map_to_nccl_ops_and_avg_falls_back_to_a_sum_without_nccl_avg():
    assert set(REDUCTIONS) == {"sum", "avg", "max", "min"}
    assert reduction(FakeNccl(None), "max", "here") == (FakeNccl.NCCL_MAX, False)
    assert reduction(FakeNccl(None), "avg", "here") == (AVG, False)

    class OldNccl:
        NCCL_SUM = 0

    assert reduction(OldNccl, "avg", "here") == (0, True)
    with pytest.raises(ValueError, match="unknown reduction op 'prod'"):
        reduction(FakeNccl(None), "prod", "here")


# ---- collectives and point-to-point through the wiring ---------------------------------------------------
def collectives(control, with_avg):
    comm, _ = nccl_over(control, with_avg)
    r = comm.rank
    out = {}
    x = np.arange(6, dtype=np.float32) + r
    out["sum"] = comm.all_reduce(x.copy())
    out["avg"] = comm.all_reduce(x.copy(), op="avg")
    out["max"] = comm.all_reduce(x.copy(), op="max", async_op=True).wait()
    out["reduce_scatter"] = comm.reduce_scatter(np.arange(8, dtype=np.float64).reshape(4, 2) * (r + 1))
    out["all_gather"] = comm.all_gather(np.full((1, 3), r, np.int64))
    out["broadcast"] = comm.broadcast(np.full(4, r, np.float16), src=1)
    comm.barrier()
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_avg", [True, False])
def test_collectives_through_the_wiring_give_the_reductions_shapes_and_roots_asked_for(local_cluster, with_avg):
    first, second = local_cluster(2).run(collectives, with_avg)
    x0, x1 = np.arange(6, dtype=np.float32), np.arange(6, dtype=np.float32) + 1
    for out in (first, second):
        np.testing.assert_array_equal(out["sum"], x0 + x1)
        np.testing.assert_array_equal(out["avg"], (x0 + x1) / 2)
        np.testing.assert_array_equal(out["max"], x1)
        np.testing.assert_array_equal(out["broadcast"], np.ones(4, np.float16))
        np.testing.assert_array_equal(out["all_gather"], [[0, 0, 0], [1, 1, 1]])
    full = np.arange(8, dtype=np.float64).reshape(4, 2) * 3
    np.testing.assert_array_equal(first["reduce_scatter"], full[:2])
    np.testing.assert_array_equal(second["reduce_scatter"], full[2:])


def point_to_point(control):
    comm, _ = nccl_over(control)
    if comm.rank == 0:
        comm.isend(np.arange(6, dtype=np.float16).reshape(2, 3), 1, tag=5).wait()
        comm.send(np.arange(4, dtype=np.int32), 1, tag=6)
        comm.send(np.ones(2, np.float32), 1, tag=7)
        comm.send(np.ones(2, np.float32), 1, tag=8)
        return None
    first = comm.irecv(0, tag=5)
    second = comm.irecv(0, tag=6)
    a, b = first.wait(), second.wait()
    into = np.zeros(2, np.float32)
    comm.recv(0, tag=7, out=into)
    return a, b, into, comm.recv(0, tag=8)


@pytest.mark.timeout(60)
def test_point_to_point_sends_shape_and_dtype_ahead_and_delivers_in_order(local_cluster):
    _, (a, b, into, last) = local_cluster(2).run(point_to_point)
    assert a.dtype == np.float16 and a.shape == (2, 3)
    np.testing.assert_array_equal(a, np.arange(6).reshape(2, 3))
    assert b.dtype == np.int32 and list(b) == [0, 1, 2, 3]
    np.testing.assert_array_equal(into, [1, 1])
    np.testing.assert_array_equal(last, [1, 1])


def waits_out_of_order(control):
    comm, _ = nccl_over(control)
    if comm.rank == 0:
        comm.send(np.zeros(2, np.float32), 1, tag=1)
        comm.send(np.zeros(3, np.float32), 1, tag=2)
        return None
    first, second = comm.irecv(0, tag=1), comm.irecv(0, tag=2)
    with pytest.raises(RuntimeError, match="this is message 1 from rank 0, but NCCL delivers message 0 next"):
        second.wait()
    return first.wait().shape


@pytest.mark.timeout(60)
def test_waiting_for_receives_out_of_the_peers_order_is_an_error_not_wrong_data(local_cluster):
    assert tuple(local_cluster(2).run(waits_out_of_order)[1]) == (2,)


def receives_into_a_wrong_out(control):
    comm, _ = nccl_over(control)
    if comm.rank == 0:
        comm.send(np.full(3, 1.0, np.float32), 1)
        comm.send(np.full(4, 2.0, np.float32), 1)
        return None
    with pytest.raises(ValueError, match=r"out is float32\[5\], the message float32\[3\]"):
        comm.recv(0, out=np.zeros(5, np.float32))
    return comm.recv(0).tolist()


@pytest.mark.timeout(60)
def test_a_receive_into_an_out_of_the_wrong_shape_raises_and_the_next_receive_gets_the_next_message(local_cluster):
    """NCCL delivers a peer's messages in order: the refused message is received all the same (into
    a scratch array), or the next receive would get its bytes."""
    assert local_cluster(2).run(receives_into_a_wrong_out)[1] == [2.0] * 4


# ---- checks before anything is enqueued, and timeouts -----------------------------------------------------
def refusals(control):
    comm, fake = nccl_over(control)
    fake.calls.clear()
    errors = []
    for call in (lambda: comm.all_reduce(np.zeros(3, np.int16)),
                 lambda: comm.all_reduce(np.zeros(6, np.float32)[::2]),
                 lambda: comm.all_reduce(np.zeros(3, np.float32), op="prod"),
                 lambda: comm.all_reduce(np.zeros(3, np.int32), op="avg"),
                 lambda: comm.reduce_scatter(np.zeros(3, np.float32)),
                 lambda: comm.broadcast(np.zeros(3, np.float32), src=2),
                 lambda: comm.isend(np.zeros(3, np.float32), dst=5),
                 lambda: comm.all_gather([1.0, 2.0]),
                 lambda: comm.all_reduce(np.zeros(3, np.float32), timeout=0),
                 lambda: comm.broadcast(np.zeros(3, np.float32), timeout=-1.0),
                 lambda: comm.all_gather(np.zeros(3, np.float32), timeout="1"),
                 lambda: comm.reduce_scatter(np.zeros(4, np.float32), timeout=float("nan")),
                 lambda: comm.isend(np.zeros(3, np.float32), dst=1, timeout=True),
                 lambda: comm.irecv(1, timeout=0),
                 lambda: comm.irecv(1, out=[0.0, 0.0])):
        try:
            call()
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    return errors, fake.calls


@pytest.mark.timeout(60)
def test_arrays_and_arguments_nccl_cannot_take_are_refused_before_anything_is_enqueued(local_cluster):
    errors, calls = local_cluster(2).run(refusals)[0]
    assert calls == []
    assert len(errors) == 15 and all("(rank 0 of 2" in e and "\n" not in e for e in errors)
    for error, expected in zip(errors, ["no datatype for int16", "C-contiguous", "unknown reduction op 'prod'",
                                        "'avg' needs a floating dtype", "divisible by the group size 2",
                                        "peer 2 is not a rank", "peer 5 is not a rank", "got builtins.list",
                                        "timeout must be a positive number of seconds, got 0",
                                        "got -1.0", "got '1'", "got nan", "got True", "recv", "got builtins.list"]):
        assert expected in error, (expected, error)


class NeverDone:
    done = False


def stuck(control):
    comm, fake = nccl_over(control)
    comm.arrays.event_type = NeverDone  # a kernel waiting forever on a peer
    handle = comm.all_reduce(np.zeros(3, np.float32), async_op=True, timeout=0.2)
    assert not handle.is_done()
    with pytest.raises(CommTimeout, match=r"nccl all_reduce \(rank 0 of 1.*not finished after 0.2s"):
        handle.wait()
    with pytest.raises(CommTimeout, match="was aborted earlier"):
        comm.all_reduce(np.zeros(3, np.float32))
    return comm._comm.aborted


@pytest.mark.timeout(60)
def test_a_wait_past_its_timeout_aborts_nccl_and_names_the_operation(local_cluster):
    assert local_cluster(1).run(stuck) == [True]


def without_nccl_library(control):
    fake = FakeNccl(control, unique_id_for(7))
    fake.available = False
    with pytest.raises(RuntimeError, match=r"rank 0\): CuPy found no NCCL library"):
        NcclCommunicator(control, nccl=fake, arrays=HostArrays())
    return fake.calls


@pytest.mark.timeout(60)
def test_a_cupy_without_nccl_is_a_one_line_error_before_anything_starts(local_cluster):
    assert local_cluster(1).run(without_nccl_library) == [[]]

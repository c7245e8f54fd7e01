"""The communicator interface: what model code may rely on, implemented by both communicators."""
import inspect
import pathlib
import re

import numpy as np
import pytest

from ringpipe.runtime import Communicator, CommunicatorInterface
from ringpipe.runtime.comm_interface import CommHandle
from ringpipe.runtime.nccl_communicator import NcclCommunicator
from tests.test_nccl_communicator import nccl_over

MEMBERS = [name for name in dir(CommunicatorInterface) if not name.startswith("_")]
METHODS = [name for name in MEMBERS if inspect.isfunction(getattr(CommunicatorInterface, name))]


def test_the_interface_has_the_members_the_model_code_needs():
    assert set(MEMBERS) == {"rank", "size", "ranks", "timeout", "tracer", "bytes_sent", "new_group", "destroy", "isend",
                            "irecv", "send", "recv", "all_reduce", "all_gather", "reduce_scatter", "broadcast",
                            "barrier"}


@pytest.mark.parametrize("cls", [Communicator, NcclCommunicator])
def test_each_communicator_class_has_every_member_with_the_interfaces_parameters(cls):
    assert [name for name in MEMBERS if not hasattr(cls, name)] == []
    for name in METHODS:
        theirs = inspect.signature(getattr(cls, name)).parameters
        ours = inspect.signature(getattr(CommunicatorInterface, name)).parameters
        assert [(p.name, p.default) for p in theirs.values()] == [(p.name, p.default) for p in ours.values()], name


def both_communicators(control):
    nccl, _ = nccl_over(control)
    out = {}
    for name, comm in (("zmq", control), ("nccl", nccl)):
        before = comm.bytes_sent
        handle = comm.all_reduce(np.ones(1000, np.float32), async_op=True)
        is_handle = isinstance(handle, CommHandle)
        handle.wait()
        out[name] = [isinstance(comm, CommunicatorInterface), is_handle, comm.timeout, comm.bytes_sent - before,
                     comm.rank, comm.size, list(comm.ranks)]
    return out


@pytest.mark.timeout(60)
def test_both_communicators_are_instances_of_the_interface_and_count_the_bytes_they_send(local_cluster):
    for rank, out in enumerate(local_cluster(2, timeout=30.0).run(both_communicators)):
        for name in ("zmq", "nccl"):
            is_comm, is_handle, timeout, sent, r, size, ranks = out[name]
            assert (is_comm, is_handle, timeout, r, size, ranks) == (True, True, 30.0, rank, 2, [0, 1]), name
            assert sent >= 4000, name  # at least one copy of the 4000-byte buffer left this rank


def test_model_cluster_and_tools_reach_no_communicator_internals():
    root = pathlib.Path(__file__).resolve().parents[1]
    internals = re.compile(r"\.engine\b|\b\w*comm\w*\.(config|group|_\w+)\b|\bworld\.(config|group|engine)\b")
    found = [f"{path.relative_to(root)}:{number}: {line.strip()}"
             for folder in ("model", "cluster", "tools") for path in sorted((root / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if internals.search(line)]
    assert found == []

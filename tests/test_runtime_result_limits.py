"""A result a worker cannot deliver fails its call at once, naming the rank, the call and why."""
import numpy as np
import pytest

from ringpipe.runtime import RemoteError, wire


def oversized_bytes_on_rank_0(comm):
    return b"\0" * (wire.MAX_HEADER_BYTES + 1) if comm.rank == 0 else b"small"


def unencodable_on_rank_1(comm, kind):
    if comm.rank != 1:
        return 0
    return 2 ** 70 if kind == "huge int" else object()


def bytes_of(comm, n):
    return b"\0" * n


def rank_of(comm):
    return comm.rank


@pytest.mark.timeout(90)
def test_a_result_over_the_control_message_limit_fails_the_call_naming_rank_call_and_limit(local_cluster):
    cluster = local_cluster(2)
    with pytest.raises(RemoteError) as info:
        cluster.run(oversized_bytes_on_rank_0)
    first_line = str(info.value).splitlines()[0]
    assert info.value.rank == 0 and "oversized_bytes_on_rank_0" in first_line
    assert f"limit of {wire.MAX_HEADER_BYTES} bytes" in first_line
    assert cluster.run(rank_of) == [0, 1]  # the cluster goes on


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["huge int", "object"])
def test_an_unencodable_result_fails_the_call_on_the_driver(local_cluster, kind):
    cluster = local_cluster(2)
    with pytest.raises(RemoteError, match="rank 1 raised .*the result could not be sent") as info:
        cluster.run(unencodable_on_rank_1, kind)
    assert info.value.rank == 1
    assert cluster.run(rank_of) == [0, 1]


@pytest.mark.timeout(60)
def test_a_result_the_driver_rejects_fails_the_call_it_names(local_cluster, monkeypatch):
    cluster = local_cluster(2)
    # Only the driver's limit shrinks: the workers send what the driver then rejects on receipt.
    monkeypatch.setattr(wire, "MAX_HEADER_BYTES", 1 << 20)
    with pytest.raises(RemoteError, match="driver rejected the result") as info:
        cluster.run(bytes_of, 2 << 20)
    assert info.value.rank == 0 and "bytes_of" in str(info.value).splitlines()[0]
    monkeypatch.undo()
    assert cluster.run(rank_of) == [0, 1]


def test_encode_refuses_a_header_the_receiver_would_reject(monkeypatch):
    monkeypatch.setattr(wire, "MAX_HEADER_BYTES", 1000)
    with pytest.raises(wire.WireError, match="exceeds the control-message limit of 1000"):
        wire.encode({"value": b"\0" * 2000})
    assert len(wire.encode({"value": np.zeros(2000, np.uint8)})[0]) < 1000  # arrays travel outside


def test_peek_call_reads_kind_and_id_of_a_map_without_its_other_values():
    header = wire.encode({"t": "result", "id": 7, "value": [b"\0" * 100, np.zeros(3)]})[0]
    assert wire.peek_call(header) == ("result", 7)
    assert wire.peek_call(b"\xc1 not msgpack") == (None, None)

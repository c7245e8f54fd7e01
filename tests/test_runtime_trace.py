"""Trace recording in the runtime: spans with bytes/peer/flow ids, clock offsets, nothing when off."""
import json
import os

import numpy as np

from ringpipe.runtime.trace import Tracer


def traced_work(comm):
    with comm.tracer.span("forward", microbatch=0, stage=comm.rank):
        x = np.ones(1000) * comm.rank
    if comm.rank == 0:
        comm.send(x, 1, tag=3)
    elif comm.rank == 1:
        comm.recv(0, tag=3)
    comm.all_reduce(x)
    comm.tracer.counter("activation bytes", 1234)
    return len(comm.tracer.events)


def test_traces_record_compute_and_comm_spans_with_matching_flow_ids(local_cluster, tmp_path):
    cluster = local_cluster(2)
    cluster.start_trace()
    cluster.run(traced_work)
    paths = cluster.stop_trace(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["trace-rank0.json", "trace-rank1.json"]
    ranks = [json.load(open(p)) for p in sorted(paths)]
    spans = [{e[1]: e for e in r["events"] if e[0] == "X"} for r in ranks]
    assert spans[0]["forward"][6] == {"microbatch": 0, "stage": 0}
    send, recv = spans[0]["send"], spans[1]["recv"]
    assert send[2] == recv[2] == "comm" and send[3] == "comm"
    assert send[6]["bytes"] == 8000 and send[6]["peer"] == 1 and recv[6]["peer"] == 0
    assert send[6]["flow"] == recv[6]["flow"]
    assert recv[6]["wait_us"] >= 0
    assert spans[0]["all_reduce"][6]["flow"] == spans[1]["all_reduce"][6]["flow"]
    assert any(e[0] == "C" and e[1] == "activation bytes" for e in ranks[0]["events"])
    clocks = json.load(open(tmp_path / "clocks.json"))
    for phase in ("start", "end"):
        for rank in ("0", "1"):
            sample = clocks["offsets"][phase][rank]
            # Same host, same monotonic clock: the offset is within the round trip.
            assert abs(sample["offset_ns"]) <= sample["rtt_ns"]


def test_nothing_is_recorded_when_tracing_is_off(local_cluster):
    assert local_cluster(2).run(traced_work) == [0, 0]


def test_tracer_span_is_a_noop_when_disabled(tmp_path):
    tracer = Tracer(0)
    with tracer.span("x"):
        pass
    assert tracer.events == []
    tracer.start()
    with tracer.span("x", k=1):
        pass
    path = tracer.stop(str(tmp_path))
    assert json.load(open(path))["events"][0][:4] == ["X", "x", "compute", "compute"]

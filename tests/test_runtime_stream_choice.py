"""Streamed or plain copies for peers, chosen per size class by each channel's own timings
(runtime/stream_choice.py, csrc/stream_choice.c): the probes' schedule, the verdict, the size rule
where probes are off, and members of a real channel probing on the same calls with NumPy's bits."""
import numpy as np
import pytest

from ringpipe.runtime import reduce_kernels, shm_collectives, shm_wait, stream_choice
from ringpipe.runtime.shm_wait import unavailable_reason
from tests.test_runtime_env_setting import check_setting

needs_c = pytest.mark.skipif(reduce_kernels.unavailable_reason() is not None or unavailable_reason("c") is not None,
                             reason="no C helper here")
STREAM_MIN, SIZE_RULE = 4096, 777  # (a size rule the probes never give, to tell the two apart)
PLAIN_NS, STREAMED_NS = 2_000_000_000, 1_000_000_000  # what a probe "took": passed as a negative exclusion


@pytest.fixture(scope="module")
def lib():
    if unavailable_reason("c") is not None:
        pytest.skip("no C helper here")
    return shm_wait._build_library()


def state(period=stream_choice.MIN_PERIOD):
    s = stream_choice.new_state()
    s[stream_choice.SC_PERIOD] = period
    return s


def call(lib, s, kind=stream_choice.KIND_HALVES, nbytes=65536, plain_ns=PLAIN_NS, streamed_ns=STREAMED_NS,
         record=True):
    """One operation: its threshold, then (record) its time, as though the call took plain_ns or
    streamed_ns (the real time, microseconds, is far below the difference)."""
    chosen = lib.rp_stream_choose(s.ctypes.data, kind, nbytes, STREAM_MIN, SIZE_RULE)
    if record:
        lib.rp_stream_record(s.ctypes.data, -(streamed_ns if chosen == STREAM_MIN else plain_ns))
    return chosen


def test_the_first_calls_of_a_class_alternate_then_the_faster_way_holds_until_the_next_probes(lib):
    s = state()
    period = stream_choice.MIN_PERIOD
    first = [call(lib, s) for _ in range(stream_choice.PROBE_CALLS)]
    assert first == [0, STREAM_MIN] * stream_choice.SC_SAMPLES  # plain, streamed, ...
    assert stream_choice.verdicts(s) == {(stream_choice.KIND_HALVES, 16): "streamed"}
    rest = [call(lib, s, plain_ns=1, streamed_ns=10**9) for _ in range(period - stream_choice.PROBE_CALLS)]
    assert rest == [STREAM_MIN] * len(rest)  # (not probes: their times change nothing)
    assert stream_choice.verdicts(s) == {(stream_choice.KIND_HALVES, 16): "streamed"}
    # The next round of probes, where plain stores now win (a machine's phase changed).
    again = [call(lib, s, plain_ns=10**6, streamed_ns=10**9) for _ in range(stream_choice.PROBE_CALLS)]
    assert again == first
    assert stream_choice.verdicts(s) == {(stream_choice.KIND_HALVES, 16): "plain"}
    assert call(lib, s) == 0


def test_classes_are_per_kind_and_power_of_two_and_below_the_threshold_the_size_rule_holds_uncounted(lib):
    s = state()
    for _ in range(stream_choice.PROBE_CALLS):
        call(lib, s, stream_choice.KIND_REDUCE, 65536 + 1000)  # floor(log2): class 16
        call(lib, s, stream_choice.KIND_COPY, (1 << 20) - 1, plain_ns=10**6)  # class 19
        assert call(lib, s, stream_choice.KIND_HALVES, STREAM_MIN - 1) == SIZE_RULE
    assert stream_choice.verdicts(s) == {(stream_choice.KIND_REDUCE, 16): "streamed",
                                         (stream_choice.KIND_COPY, 19): "plain"}
    classes = s[stream_choice.SC_CLASSES_AT :].reshape(stream_choice.SC_KINDS, stream_choice.SC_SIZES, -1)
    assert classes[stream_choice.KIND_HALVES, :, stream_choice.SC_CALLS].sum() == 0
    # Following a class counts nothing and takes its verdict (a broadcast's root), else the size rule.
    follow = lib.rp_stream_follow
    assert follow(s.ctypes.data, stream_choice.KIND_COPY, 1 << 19, STREAM_MIN, SIZE_RULE) == 0
    assert follow(s.ctypes.data, stream_choice.KIND_COPY, 1 << 20, STREAM_MIN, SIZE_RULE) == SIZE_RULE
    assert classes[stream_choice.KIND_COPY, 19, stream_choice.SC_CALLS] == stream_choice.PROBE_CALLS
    # A size past the last class counts in the last.
    assert call(lib, s, stream_choice.KIND_COPY, 1 << 62) == 0


def test_a_probe_that_was_not_recorded_leaves_the_verdict_to_the_others(lib):
    s = state()
    for k in range(stream_choice.PROBE_CALLS):
        # Every streamed probe but the last went on in Python (a wait past the spin): unrecorded.
        call(lib, s, record=k % 2 == 0 or k == stream_choice.PROBE_CALLS - 1)
    assert stream_choice.verdicts(s) == {(stream_choice.KIND_HALVES, 16): "streamed"}
    s = state()
    for k in range(stream_choice.PROBE_CALLS):
        call(lib, s, record=k % 2 == 0)  # no streamed sample at all: no verdict, the size rule
    assert stream_choice.verdicts(s) == {}
    assert call(lib, s) == SIZE_RULE
    # A record without a probe before it (the call followed a verdict) changes nothing.
    lib.rp_stream_record(s.ctypes.data, -PLAIN_NS)
    assert stream_choice.verdicts(s) == {}


def test_without_probes_or_state_the_size_rule_decides(lib):
    s = state(period=0)
    assert [call(lib, s) for _ in range(30)] == [SIZE_RULE] * 30
    assert stream_choice.verdicts(s) == {}
    assert lib.rp_stream_choose(None, stream_choice.KIND_HALVES, 65536, STREAM_MIN, SIZE_RULE) == SIZE_RULE
    lib.rp_stream_record(None, 0)  # (nothing to record into: no crash)


def test_the_probe_period_comes_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    check_setting(monkeypatch, "RINGPIPE_SHM_STREAM_PROBE", stream_choice.period, lambda: None,
                  [(None, stream_choice.DEFAULT_PERIOD), ("off", 0), ("OFF", 0), ("20", 20), (" 4096 ", 4096)],
                  ["19", "0", "-1", "often", "1e3"])
    monkeypatch.setenv("RINGPIPE_SHM_STREAM_PROBE", "off")
    assert stream_choice.new_state()[stream_choice.SC_PERIOD] == 0


CALLS = 3 * stream_choice.MIN_PERIOD + stream_choice.PROBE_CALLS  # four rounds of probes per class


def probe_on_a_channel(comm):
    """Every way into the choice, CALLS times each with period MIN_PERIOD: all_reduce's one-round
    reduce (16 KiB), its reduce-scatter + all-gather round (64 KiB, then 96 KiB from a strided array on
    rank 1: the Python path's chunk loop there), all_gather (32 KiB pieces), broadcast (follows the
    all_gathers). Returns (results equal NumPy's rank-order bits, calls per class, verdicts)."""
    comm.barrier()  # (opens the channel)
    channel = comm.engine.channels[comm.group.gid]
    channel.stream_choice[stream_choice.SC_PERIOD] = stream_choice.MIN_PERIOD
    channel.stream_choice[stream_choice.SC_CLASSES_AT :] = 0  # (a pooled cluster's earlier tests counted too)
    ok = True
    for step in range(CALLS):
        rng = [np.random.default_rng(1000 * step + rank) for rank in range(2)]
        for count in (4096, 16384, 24576):
            inputs = [r.standard_normal(count).astype(np.float32) for r in rng]
            x = inputs[comm.rank].copy()
            if count == 24576 and comm.rank == 1:
                x = np.repeat(x, 2)[::2]
            ok &= comm.all_reduce(x).tobytes() == (inputs[0] + inputs[1]).tobytes()
        piece = np.full(8192, step + comm.rank, np.float32)
        gathered = np.asarray(comm.all_gather(piece)).reshape(-1)
        ok &= bool((gathered == np.repeat([step, step + 1], 8192)).all())
        ok &= bool((comm.broadcast(np.full(8192, step * (comm.rank == 0), np.float32), src=0) == step).all())
    classes = channel.stream_choice[stream_choice.SC_CLASSES_AT :].reshape(
        stream_choice.SC_KINDS, stream_choice.SC_SIZES, -1)[:, :, stream_choice.SC_CALLS]
    return bool(ok), classes.tolist(), sorted(stream_choice.verdicts(channel.stream_choice))


@needs_c
@pytest.mark.skipif(shm_collectives.HOST_CORES < 2, reason="one core: ranks share it, nothing streams")
def test_members_probe_on_the_same_calls_and_keep_numpys_bits(local_cluster):
    (ok0, calls0, verdicts0), (ok1, calls1, verdicts1) = local_cluster(2).run(probe_on_a_channel)
    assert ok0 and ok1
    assert calls0 == calls1  # the same calls counted in the same classes: probes on the same calls
    counted = {(kind, size): n for kind, row in enumerate(calls0) for size, n in enumerate(row) if n}
    # (64 and 96 KiB: both class 16; a broadcast counts nothing)
    assert counted == {(stream_choice.KIND_REDUCE, 14): CALLS, (stream_choice.KIND_HALVES, 16): 2 * CALLS,
                       (stream_choice.KIND_COPY, 15): CALLS}
    # Four rounds of probes per class: each class timed both ways at least once (a probe whose wait
    # went to Python is unrecorded) and chose.
    assert {(kind, size) for kind, size in verdicts0} == set(counted)

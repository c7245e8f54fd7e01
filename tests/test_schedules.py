"""Pipeline schedules are data: every list passes the simulator's checks and has the known bubble."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringpipe.model.parallel.pipeline_parallel.schedules import Action, Kind, build_schedule, message_tag, split_layers
from ringpipe.model.parallel.pipeline_parallel.simulator import ScheduleError, format_timeline, simulate, theoretical_bubble

RANKS, MICROBATCHES, VIRTUAL = range(1, 6), range(1, 13), range(1, 4)
SPLIT_COSTS = {Kind.FORWARD: 1, Kind.BACKWARD_INPUT: 1, Kind.BACKWARD_WEIGHT: 1, Kind.BACKWARD: 2}


def valid_shapes():
    for name in ("gpipe", "1f1b", "zb-h1", "interleaved"):
        for p in RANKS:
            for m in MICROBATCHES:
                for v in (VIRTUAL if name == "interleaved" else (1,)):
                    if v == 1 or m % p == 0:
                        yield name, p, m, v


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "interleaved"])
def test_every_valid_shape_passes_the_simulator_checks(name):
    for shape_name, p, m, v in valid_shapes():
        if shape_name == name:
            for latency in (0.0, 0.5):
                simulate(build_schedule(name, p, m, v), latency=latency)


def test_every_rank_ends_with_one_optimizer_step():
    for name, p, m, v in valid_shapes():
        for actions in build_schedule(name, p, m, v):
            assert actions[-1] == Action(Kind.OPTIMIZER_STEP)
            assert sum(a.kind is Kind.OPTIMIZER_STEP for a in actions) == 1


def test_each_send_has_one_receive_with_the_same_tag():
    for name, p, m, v in valid_shapes():
        schedule = build_schedule(name, p, m, v)
        sends = sorted((r, a.peer, message_tag(a, m)) for r, acts in enumerate(schedule) for a in acts
                       if a.kind in (Kind.SEND_ACTIVATION, Kind.SEND_GRAD))
        receives = sorted((a.peer, r, message_tag(a, m)) for r, acts in enumerate(schedule) for a in acts
                          if a.kind in (Kind.RECV_ACTIVATION, Kind.RECV_GRAD))
        assert sends == receives
        assert len({tag for _, _, tag in sends}) == len(sends)


def test_interleaved_places_stage_s_on_rank_s_mod_p():
    schedule = build_schedule("interleaved", 3, 6, 2)
    for rank, actions in enumerate(schedule):
        assert {a.stage for a in actions if a.kind is Kind.FORWARD} == {rank, rank + 3}


@pytest.mark.parametrize("p", RANKS)
@pytest.mark.parametrize("m", MICROBATCHES)
def test_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m):
    result = simulate(build_schedule("1f1b", p, m), costs={Kind.FORWARD: 1, Kind.BACKWARD: 1})
    assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert result.bubble_fraction == pytest.approx(theoretical_bubble("1f1b", p, m))


def test_gpipe_keeps_every_microbatch_in_flight_on_every_rank():
    for p in RANKS:
        for m in MICROBATCHES:
            assert simulate(build_schedule("gpipe", p, m)).peak_in_flight == [m] * p


def test_in_flight_is_also_counted_per_virtual_stage():
    result = simulate(build_schedule("interleaved", 2, 4, 2))
    assert set(result.peak_in_flight_per_stage) == {0, 1, 2, 3}
    # a rank's peak is at most the sum of its stages' peaks, and at least the largest one
    for rank, peak in enumerate(result.peak_in_flight):
        stage_peaks = [result.peak_in_flight_per_stage[s] for s in (rank, rank + 2)]
        assert max(stage_peaks) <= peak <= sum(stage_peaks)


def test_1f1b_keeps_at_most_p_minus_rank_in_flight():
    for p in RANKS:
        for m in MICROBATCHES:
            peaks = simulate(build_schedule("1f1b", p, m)).peak_in_flight
            assert all(peak <= p - rank for rank, peak in enumerate(peaks))


def test_zb_h1_has_1f1b_memory_and_a_smaller_bubble():
    for p in RANKS:
        for m in MICROBATCHES:
            zb = simulate(build_schedule("zb-h1", p, m), costs=SPLIT_COSTS)
            one_f_one_b = simulate(build_schedule("1f1b", p, m), costs=SPLIT_COSTS)
            assert zb.peak_in_flight == one_f_one_b.peak_in_flight
            if p >= 2 and m >= p:
                assert zb.bubble_fraction < one_f_one_b.bubble_fraction
                # the paper's (p−1)/(3m) relative to ideal compute time, for T_F = T_B = T_W
                assert zb.bubble_fraction == pytest.approx(theoretical_bubble("zb-h1", p, m))


def test_interleaved_bubble_is_megatrons_and_below_1f1b():
    for name, p, m, v in valid_shapes():
        if name == "interleaved" and p >= 2 and v >= 2:
            result = simulate(build_schedule("interleaved", p, m, v))
            assert result.bubble_fraction == pytest.approx(theoretical_bubble("interleaved", p, m, v))
            assert result.bubble_fraction < simulate(build_schedule("1f1b", p, m)).bubble_fraction


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 8), m=st.integers(1, 24), latency=st.sampled_from([0.0, 0.25, 2.0]),
       forward=st.floats(0.1, 3.0), backward=st.floats(0.1, 3.0))
def test_random_shapes_and_costs_simulate_cleanly(p, m, latency, forward, backward):
    costs = {Kind.FORWARD: forward, Kind.BACKWARD: 2 * backward, Kind.BACKWARD_INPUT: backward,
             Kind.BACKWARD_WEIGHT: backward}
    results = {name: simulate(build_schedule(name, p, m), costs=costs, latency=latency)
               for name in ("gpipe", "1f1b", "zb-h1")}
    if latency == 0:  # with latency 1F1B exposes it more often than GPipe, and may be slower
        assert results["1f1b"].makespan == pytest.approx(results["gpipe"].makespan)
        assert results["zb-h1"].makespan <= results["1f1b"].makespan + 1e-9
    for result in results.values():
        assert sum(result.busy) == pytest.approx(p * m * (forward + 2 * backward))


def test_per_rank_costs_are_accepted():
    slow_last_rank = lambda rank, action: 2.0 if rank == 2 and action.kind is Kind.FORWARD else 1.0  # noqa: E731
    result = simulate(build_schedule("1f1b", 3, 6), costs=slow_last_rank)
    assert result.busy == [12.0, 12.0, 18.0]


def test_timeline_shows_each_rank_in_order():
    text = format_timeline(simulate(build_schedule("1f1b", 2, 2), costs={Kind.BACKWARD: 1}))
    assert text.splitlines()[1:] == ["rank 0: F0 F1 ...B0 ...B1", "rank 1: ...F0 B0 F1 B1 ..."]


# ---- the simulator rejects broken schedules ----------------------------------------------------------

def test_missing_receive_is_reported_with_rank_and_microbatch():
    schedule = build_schedule("1f1b", 2, 2)
    schedule[1] = [a for a in schedule[1] if not (a.kind is Kind.RECV_ACTIVATION and a.microbatch == 1)]
    with pytest.raises(ScheduleError, match=r"rank 1.*F1@s1.*input of stage 1 for micro-batch 1"):
        simulate(schedule)


def test_send_without_receive_is_reported():
    schedule = build_schedule("1f1b", 2, 1)
    schedule[0] = schedule[0][:2]  # rank 0 stops after sending micro-batch 0: the gradient never arrives
    with pytest.raises(ScheduleError, match=r"sends without a matching receive: grad of micro-batch 0 "
                                            r"across boundary 0 \(sent by rank 1\)"):
        simulate(schedule)


def test_deadlock_names_the_stuck_ranks():
    # both ranks receive before they send: classic deadlock
    schedule = [[Action(Kind.RECV_GRAD, 0, 0, 1), Action(Kind.FORWARD, 0, 0)],
                [Action(Kind.RECV_ACTIVATION, 0, 1, 0), Action(Kind.FORWARD, 0, 1)]]
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 at action 0: .*rank 1 at action 0"):
        simulate(schedule)


def test_weight_gradient_before_input_gradient_is_rejected():
    schedule = [[Action(Kind.FORWARD, 0, 0), Action(Kind.BACKWARD_WEIGHT, 0, 0),
                 Action(Kind.BACKWARD_INPUT, 0, 0), Action(Kind.OPTIMIZER_STEP)]]
    with pytest.raises(ScheduleError, match="W before B"):
        simulate(schedule)


def test_optimizer_step_before_all_weight_gradients_is_rejected():
    schedule = [[Action(Kind.FORWARD, 0, 0), Action(Kind.BACKWARD_INPUT, 0, 0), Action(Kind.OPTIMIZER_STEP),
                 Action(Kind.BACKWARD_WEIGHT, 0, 0)]]
    with pytest.raises(ScheduleError, match="OPTIMIZER_STEP before the weight gradient of micro-batch 0"):
        simulate(schedule)


def test_backward_before_forward_is_rejected():
    schedule = [[Action(Kind.BACKWARD, 0, 0), Action(Kind.FORWARD, 0, 0), Action(Kind.OPTIMIZER_STEP)]]
    with pytest.raises(ScheduleError, match="backward before the forward"):
        simulate(schedule)


# ---- argument errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("pipedream", 2, 4), r"unknown pipeline schedule 'pipedream'; expected one of gpipe, 1f1b"),
    (("1f1b", 0, 4), r"1f1b: num_ranks must be an integer ≥ 1, got 0"),
    (("1f1b", 2, 0), r"1f1b: num_microbatches must be an integer ≥ 1, got 0"),
    (("interleaved", 2, 4, 0), r"interleaved: virtual_stages must be an integer ≥ 1, got 0"),
    (("1f1b", 2, 4, 2), r"1f1b: virtual_stages=2 needs the 'interleaved' schedule"),
    (("interleaved", 4, 6, 2), r"interleaved: num_microbatches=6 must be a multiple of num_ranks=4"),
])
def test_bad_arguments_raise_one_line_value_errors(args, message):
    with pytest.raises(ValueError, match=message) as error:
        build_schedule(*args)
    assert "\n" not in str(error.value)


def test_split_layers_is_balanced_and_covers_every_layer():
    assert split_layers(12, 4) == [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(6, 3, explicit=[1, 3, 2]) == [range(0, 1), range(1, 4), range(4, 6)]


@pytest.mark.parametrize("args, message", [
    ((3, 4), r"3 layers cannot fill 4 stages"),
    ((6, 3, [2, 2, 1]), r"explicit split \[2, 2, 1\] must have 3 entries, each ≥ 1, summing to n_layer=6"),
    ((6, 3, [3, 3, 0]), r"explicit split \[3, 3, 0\]"),
    ((6, 2, [2, 2, 2]), r"must have 2 entries"),
])
def test_split_layers_rejects_impossible_splits(args, message):
    with pytest.raises(ValueError, match=message):
        split_layers(*args)

"""Planning many layouts stays cheap: the simulator proves each schedule once and every layout's
pipeline time is one pass over the proven action order, equal to the simulator's own timing."""
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.parallel.pipeline_parallel import simulator
from ringpipe.model.parallel.pipeline_parallel.schedules import Kind, build_schedule
from ringpipe.model.planning import pipeline_timing
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.machine import load_machine
from ringpipe.model.planning.search import plan_layouts


@pytest.mark.parametrize("name,pp,m,v", [("1f1b", 4, 8, 1), ("gpipe", 3, 6, 1), ("zb-h1", 4, 8, 1),
                                         ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2)])
def test_the_compiled_schedule_times_a_step_as_the_simulator_does(name, pp, m, v):
    schedule = build_schedule(name, pp, m, v)
    costs = {s: {Kind.FORWARD: 1.0 + 0.1 * s, Kind.BACKWARD: 2.5 + 0.2 * s, Kind.BACKWARD_INPUT: 1.2 + s / 7,
                 Kind.BACKWARD_WEIGHT: 0.9 + s / 11} for s in range(pp * v)}
    expected = simulator.simulate(schedule, lambda rank, action: costs[action.stage].get(action.kind, 0.0)
                                  if action.stage is not None else 0.0, latency=0.3)
    makespan, bubble = pipeline_timing.CompiledSchedule(schedule).run(costs, latency=0.3)
    assert makespan == pytest.approx(expected.makespan, rel=1e-12)
    assert bubble == pytest.approx(expected.bubble_fraction, rel=1e-12)


def test_planning_hundreds_of_layouts_simulates_each_schedule_once(monkeypatch):
    calls = []
    real = simulator.simulate
    monkeypatch.setattr(pipeline_timing, "simulate", lambda schedule, *a, **k: calls.append(1) or real(schedule, *a, **k))
    pipeline_timing.compiled_schedule.cache_clear()
    pipeline_timing.pipeline_time.cache_clear()
    inventory = GPT2Inventory(GPTConfig(n_layer=8, n_head=8, n_embd=512, block_size=256, vocab_size=8192))
    report = plan_layouts(inventory, 8, 32, load_machine("h100-8x-node"))
    schedules = {(c.schedule, c.pp, c.microbatches, c.virtual_stages) for c, _, _ in report.ranked}
    assert len(report.ranked) > 200  # every (dp, tp, pp, schedule, micro-batches, ZeRO, sp, recompute)
    assert len(calls) == len(schedules)

"""What `ringpipe plan` prints: why the first layout is ahead (the part it saves, or — when speeds
tie — what decides), and every number with its unit in a fixed, readable format."""
import re

import pytest

from ringpipe.cluster.plan_cmd import duration, format_memory, rate, why_best
from ringpipe.model.planning.memory import Candidate, RankMemory
from ringpipe.model.planning.search import PlanReport
from ringpipe.model.planning.step_time import StepTiming
from tests.conftest import run_cli

SMALL = ["--n-layer", 4, "--n-head", 4, "--n-embd", 64, "--block-size", 32, "--vocab", 256, "--batch-size", 8]
GIB = 1 << 30


def layout(candidate, seconds, gib, parts):
    timing = StepTiming(seconds, 1e6 / seconds, 0.5, 1e12, parts)
    return candidate, [RankMemory(0, weights=int(gib * GIB))], timing


def test_when_speeds_tie_the_winner_is_explained_by_memory_not_a_zero_saving():
    report = PlanReport(ranked=[layout(Candidate(8, 2, sequence_parallel=True), 0.1000, 3.41, {"compute": 0.1}),
                                layout(Candidate(8, 2), 0.1004, 3.69, {"compute": 0.1, "data-parallel gradients": 0.0004})])
    line = why_best(report)
    assert "as fast as the runner-up dp8 tp2 pp1 mb1 (100 ms vs 100 ms per step, within 1%)" in line
    assert "what decides is memory: 3.41 GiB vs 3.69 GiB" in line
    assert "saving" not in line and "0.0 ms" not in line


def test_a_tie_where_the_first_needs_more_memory_points_at_the_leaner_runner_up():
    report = PlanReport(ranked=[layout(Candidate(4), 0.100, 6.5, {"compute": 0.1}),
                                layout(Candidate(4, zero=1), 0.1005, 5.0, {"compute": 0.1005})])
    line = why_best(report)
    assert "ahead by only 0.5%" in line and "the runner-up needs less memory (5.00 GiB vs 6.50 GiB" in line


def test_a_faster_winner_names_the_part_it_saves_most_in_with_its_unit():
    report = PlanReport(ranked=[layout(Candidate(4), 0.0100, 1.0, {"compute": 0.0100, "optimizer": 0.0}),
                                layout(Candidate(2, 2), 0.0120, 1.0, {"compute": 0.01198, "optimizer": 0.00002})])
    assert why_best(report) == ("dp4 tp1 pp1 mb1 wins: 1.20× the runner-up's speed (dp2 tp2 pp1 mb1); "
                                "the largest saving is compute (1.98 ms)")


def test_step_times_and_token_rates_read_in_fixed_notation_with_their_unit():
    assert [duration(s) for s in (1.039e-05, 0.08713, 0.9999, 1.5)] == ["10.4 µs", "87.1 ms", "1.00 s", "1.50 s"]
    assert [rate(r) for r in (512, 94020, 2.062e6, 999_990)] == ["512", "94.0k", "2.06M", "1.00M"]


def test_each_memory_part_carries_its_own_unit():
    line = format_memory(RankMemory(0, weights=2 * GIB, gradients=3 << 20, optimizer=69 << 10, activations=0),
                         cpu=False)
    assert line == "pp0: 2.00 GiB = W 2.00 GiB G 3.00 MiB O 69.0 KiB A 0 B C 0 B ws 0 B"


def test_plan_rows_have_no_e_notation_and_a_unit_on_every_size():
    result = run_cli("plan", *SMALL, "--nproc", 4, "--top", 5)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if re.match(r"\s+\d+ ", line)]
    assert len(rows) == 5
    for row in rows:
        assert not re.search(r"\de[+-]\d", row), row
        assert re.search(r" \d[\d.]* (ms|µs|s) +[\d.]+[kMG]? ", row), row
        memory = row.split("pp0: ")[1].split(";")[0]
        assert len(re.findall(r"[\d.]+ (GiB|MiB|KiB|B)\b", memory)) == 7, memory

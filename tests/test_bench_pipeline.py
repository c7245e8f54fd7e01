"""`ringpipe bench pipeline`: one traced step of a tiny two-stage model gives well-formed rows."""
import json
import statistics

from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.tools.bench_pipeline import format_table

ROW_KEYS = {"schedule", "pp", "microbatches", "virtual_stages", "window_s", "bubble_fraction", "bubble_ratio",
            "stages", "theory", "simulated_with_measured_costs", "replayed_fraction", "measured_over_theory",
            "action_costs", "p2p_latency_s", "imbalance", "per_step", "model", "definitions", "load_average",
            "core_gflops", "bubble_over_no_comm_replay", "bubble_over_no_comm_replay_median"}
STAGE_KEYS = {"rank", "compute_s", "exposed_comm_s", "bubble_s", "blocked_s", "overhead_s", "bubble_fraction",
              "optimizer_s", "actions"}


def test_bench_pipeline_writes_one_row_per_schedule_and_microbatch_count_with_bubbles_between_0_and_1(tmp_path):
    path = tmp_path / "pipeline.json"
    result = CliRunner().invoke(main, ["bench", "pipeline", "--schedules", "1f1b,zb-h1", "--microbatches", "2",
                                       "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
                                       "--microbatch-size", "1", "--warmup", "0", "--steps", "1",
                                       "--rounds", "2", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "measured" in result.output
    rows = json.loads(path.read_text())
    assert [(r["schedule"], r["microbatches"]) for r in rows] == [("1f1b", 2), ("zb-h1", 2)]
    assert "best of 2 rounds" in result.output
    for row in rows:
        assert ROW_KEYS <= set(row)
        # the reported round is the best of the two, both listed
        assert len(row["rounds"]) == 2
        assert row["bubble_fraction"] == min(r["bubble_fraction"] for r in row["rounds"])
        assert [s["rank"] for s in row["stages"]] == [0, 1]
        for stage in row["stages"]:
            assert STAGE_KEYS <= set(stage)
            assert stage["compute_s"] > 0
            assert 0.0 <= stage["bubble_fraction"] <= 1.0
        for fraction in (row["bubble_fraction"], row["theory"]["fraction"], row["replayed_fraction"],
                         row["simulated_with_measured_costs"]["fraction"]):
            assert 0.0 <= fraction <= 1.0
        # the bubble against a replay of the same step with its own compute times and no communication
        for step in row["per_step"]:
            bubble = sum(r["bubble_s"] for r in step["ranks"])
            assert step["replayed_no_comm_bubble_s"] > 0
            assert abs(step["bubble_over_no_comm_replay"] - bubble / step["replayed_no_comm_bubble_s"]) < 1e-9
        assert row["bubble_over_no_comm_replay_median"] == statistics.median(
            r["bubble_over_no_comm_replay"] for r in row["rounds"])  # the median of rounds, not the best
    assert abs(rows[0]["theory"]["fraction"] - 1 / 3) < 1e-12  # (p-1)/(m+p-1) with p = m = 2

    # stdout is the README's table: setup, header, one row per setup, targets; rounds went to stderr
    table = result.stdout.splitlines()
    assert len(table) <= 11, result.stdout
    header = next(i for i, line in enumerate(table) if line.startswith("schedule"))
    assert "measured bubble" in table[header] and "each round" in table[header]
    assert "bubble / no-comm replay" in table[header]
    assert [line.split()[:2] for line in table[header + 1:header + 3]] == [["1f1b", "2"], ["zb-h1", "2"]]
    assert "round 1/2" in result.stderr and "round 1/2" not in result.stdout
    # the per-rank details are in --json, and on the terminal with --verbose
    assert "gap/action us" not in result.stdout
    assert "gap/action us" in format_table(rows, verbose=True)


def test_bench_pipeline_rejects_a_schedule_rule_before_any_worker_starts():
    result = CliRunner().invoke(main, ["bench", "pipeline", "--schedules", "interleaved", "--microbatches", "3",
                                       "--n-layer", "4", "--steps", "1"])
    assert result.exit_code != 0
    assert "multiple of num_ranks" in result.output

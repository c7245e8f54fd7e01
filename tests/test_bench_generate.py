"""`ringpipe bench generate`: a row per layout, each checked against one worker's tokens."""
import pytest

from ringpipe.tools.bench_generate import format_table, parse_layout, run
from tests.conftest import one_error_line, run_cli


def test_layout_names_parse_into_axis_sizes():
    assert parse_layout("1") == {}
    assert parse_layout("tp2xpp2") == {"tp": 2, "pp": 2}
    with pytest.raises(ValueError, match="tq2"):
        parse_layout("tq2")


@pytest.mark.timeout(120)
def test_bench_generate_reports_tokens_per_second_and_time_to_first_token_per_layout():
    rows = run(["1", "pp2"], n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32, prompts=2,
               prompt_length=3, new_tokens=3, rounds=1)
    assert [(row["layout"], row["workers"]) for row in rows] == [("1", 1), ("pp2", 2)]
    for row in rows:
        assert row["same_tokens"] and row["tokens_per_s"] > 0 and 0 < row["ttft_mean_s"] <= row["ttft_max_s"]
    assert rows[1]["weight_mib_per_rank"] < rows[0]["weight_mib_per_rank"]  # each stage holds part of the blocks
    assert "pp2" in format_table(rows)


def test_bench_generate_refuses_a_layout_the_model_cannot_take_in_one_line():
    assert "n_head 8 is not divisible by tp 3" in one_error_line(run_cli("bench", "generate", "--layouts", "tp3"))

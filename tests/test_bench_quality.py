"""`ringpipe bench quality`: both implementations train from the same weights on the same batches."""
import json

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main

ROW_KEYS = {"implementation", "sampler", "seed", "val_loss", "val_loss_whole_split",
            "train_loss_last_100", "wall_s"}


def _bench(corpus, tmp_path, *extra, steps=3):
    path = tmp_path / "quality.json"
    result = CliRunner().invoke(main, ["bench", "quality", "--data", corpus, "--steps", str(steps),
                                       "--eval-iters", "2", "--json", str(path), *extra])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(path.read_text())


def test_bench_quality_reports_a_row_per_sampler_and_seed_without_pytorch(corpus, tmp_path):
    output, result = _bench(corpus, tmp_path, "--no-compare", "--samplers", "epoch,random",
                            "--seeds", "0,1", steps=1)  # four runs: one step each says what a row holds
    assert [(r["sampler"], r["seed"]) for r in result["rows"]] == [
        ("epoch", 0), ("epoch", 1), ("random", 0), ("random", 1)]
    for row in result["rows"]:
        assert ROW_KEYS <= set(row) and row["implementation"] == "ringpipe"
        assert 0 < row["val_loss_whole_split"] < 10
    assert set(result["means"]) == {"ringpipe/epoch", "ringpipe/random"}
    assert result["recipe"]["steps"] == 1 and "PyTorch comparison skipped" in output


def test_bench_quality_pytorch_run_matches_ringpipe_over_a_few_steps(corpus, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _, result = _bench(corpus, tmp_path)
    ours, theirs = result["rows"]
    assert theirs["implementation"] == "pytorch"
    # Same initial weights, batches, schedule and clipping: float32 rounding apart.
    for key in ("val_loss", "val_loss_whole_split", "train_loss_last_100"):
        assert abs(ours[key] - theirs[key]) < 1e-4, key


def test_bench_quality_rejects_an_unknown_sampler(corpus):
    result = CliRunner().invoke(main, ["bench", "quality", "--data", corpus, "--samplers", "shuffle"])
    assert result.exit_code == 2 and "--samplers" in result.output and "'shuffle'" in result.output

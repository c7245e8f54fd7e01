"""`ringpipe train --resume` with another --microbatches: the global batch (--batch-size) is the same,
so the run goes on as the uninterrupted one does, to float64 rounding (without dropout), in one process
and across pipeline stages. A flag that cannot change stays one line and exit status 2."""
import json

import numpy as np
import pytest

from ringpipe.model.gpt2.model import GPT
from tests.conftest import TEXT, one_error_line, run_cli

# lr == min-lr and no warmup: the learning rate does not depend on --steps, so a run of 2 steps
# resumed to 4 is the run of 4 steps cut at 2.
FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "8",
         "--lr", "1e-2", "--min-lr", "1e-2", "--warmup", "0", "--dtype", "float64", "--dropout", "0",
         "--eval-every", "0", "--eval-iters", "1"]


def train(corpus, out, steps, *args):
    result = run_cli("train", "--data", corpus, *FLAGS, "--steps", steps, "--out", out, *args)
    assert result.exit_code == 0, result.output
    return result


def rows(out) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-step run in one process, whole batches, never interrupted: (corpus, its run directory)."""
    directory = tmp_path_factory.mktemp("straight")
    corpus = directory / "corpus.txt"
    corpus.write_text(TEXT)
    train(corpus, directory / "run", 4, "--microbatches", "1")
    return corpus, directory / "run"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout,before,after", [([], "2", "4"), (["--nproc", "2", "--pp", "2"], "2", "4")],
                         ids=["one-process", "pp2"])
def test_a_run_resumed_with_other_microbatches_goes_on_as_the_uninterrupted_run(straight, tmp_path, layout, before,
                                                                                 after):
    corpus, reference = straight
    out = tmp_path / "run"
    train(corpus, out, 2, "--microbatches", before, *layout)
    train(corpus, out, 4, "--resume", "--microbatches", after, *layout)
    resumed, expected = rows(out), rows(reference)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    np.testing.assert_allclose([row["loss"] for row in resumed], [row["loss"] for row in expected], rtol=1e-12)
    assert resumed[-1]["val_loss"] == pytest.approx(expected[-1]["val_loss"], rel=1e-12)
    ours, theirs = GPT.from_pretrained(out).params, GPT.from_pretrained(reference).params
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_resuming_a_dropout_run_with_other_microbatches_says_its_masks_differ(straight, tmp_path):
    corpus, _ = straight
    out = tmp_path / "run"
    train(corpus, out, 1, "--dropout", "0.1", "--microbatches", "2")
    result = train(corpus, out, 2, "--resume", "--dropout", "0.1", "--microbatches", "4")
    assert "note: --microbatches 4 (the run had 2): dropout masks from here on differ" in result.output


def test_resuming_with_another_global_batch_is_a_usage_error(straight, tmp_path):
    corpus, _ = straight
    out = tmp_path / "run"
    train(corpus, out, 1, "--microbatches", "2")
    result = run_cli("train", "--resume", "--out", out, "--steps", 2, "--batch-size", 16, "--microbatches", 4)
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == ("Error: Invalid value for --batch-size: 16 differs from the checkpoint's 8; "
                                      "it cannot change on --resume")

"""`ringpipe train --sample` of a parallel run: the layout report first, and the sample generated in a
child process from the saved model, as the single-process run samples its own."""
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.gpt2.model import GPT


def test_a_parallel_run_reports_its_layout_and_samples_the_saved_model(corpus, tmp_path):
    out = str(tmp_path / "run")
    flags = ["train", "--data", corpus, "--n-layer", "3", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
             "--batch-size", "4", "--microbatches", "2", "--steps", "2", "--dtype", "float64", "--eval-iters", "1",
             "--seed", "3", "--nproc", "2", "--pp", "2", "--sample", "12", "--out", out]
    result = CliRunner().invoke(main, flags, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "layout: dp 1 × tp 1 × pp 2 (1f1b), 2 workers; blocks per stage 1,2 (balanced by parameter bytes); parameters per stage" \
        in result.stderr
    gpt, tokenizer = GPT.from_pretrained(out), load_tokenizer(out)
    ids = gpt.generate(gpt.xp.asarray(tokenizer.encode("\n"))[None, :], 12, seed=3)
    assert result.stdout.rstrip("\n") == tokenizer.decode(ids[0]).rstrip("\n")

"""`ringpipe train` across local workers: layouts, bad layouts, resuming with another layout."""
import os
import shutil

import numpy as np
import pytest
import tokenizers
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.data.tokenizer import load_tokenizer




def train(args, corpus, out, steps):
    flags = ["train", "--data", corpus, "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
             "--batch-size", "8", "--microbatches", "2", "--steps", str(steps), "--lr", "1e-2", "--min-lr", "1e-2",
             "--warmup", "0", "--dtype", "float64", "--eval-every", "0", "--eval-iters", "1", "--out", out, *args]
    return CliRunner().invoke(main, flags, catch_exceptions=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The weights of 4 uninterrupted steps in one process: what a run resumed under another layout
    must end with."""
    directory = tmp_path_factory.mktemp("straight")
    from tests.conftest import TEXT

    (directory / "corpus.txt").write_text(TEXT)
    assert train([], str(directory / "corpus.txt"), str(directory / "run"), 4).exit_code == 0
    return GPT.from_pretrained(str(directory / "run")).params


PIPELINE, TENSOR = ["--nproc", "2", "--pp", "2"], ["--nproc", "2", "--tp", "2"]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """two_step_run(layout) -> (run directory, CliRunner result) of 2 steps under `layout` ending with
    a 20-token sample, made once per layout: the layout test reads it, the resume tests resume a copy."""
    from tests.conftest import TEXT

    made = {}

    def run(layout: list):
        if tuple(layout) not in made:
            directory = tmp_path_factory.mktemp("two-steps")
            (directory / "corpus.txt").write_text(TEXT)
            out = str(directory / "run")
            made[tuple(layout)] = out, train([*layout, "--sample", "20"], str(directory / "corpus.txt"), out, 2)
        return made[tuple(layout)]
    return run


@pytest.mark.parametrize("layout", [PIPELINE, TENSOR,
                                    ["--nproc", "4", "--dp", "2", "--tp", "2", "--sequence-parallel"]])
def test_parallel_runs_write_a_model_gpt2_tooling_opens(corpus, two_step_run, layout):
    out, result = two_step_run(layout)
    assert result.exit_code == 0, result.output
    assert "blocks per stage" in result.stderr  # the layout report, before the workers start
    gpt = GPT.from_pretrained(out)
    assert gpt.config.n_layer == 2
    # the workers' sample is what one process generates from the exported model
    tokenizer = load_tokenizer(out)
    prompt = tokenizer.encode("\n")
    assert tokenizer.decode(gpt.generate(np.asarray(prompt)[None, :], 20, seed=0)[0]) in result.output
    assert os.path.exists(os.path.join(out, "metrics.jsonl"))
    text = open(corpus, encoding="utf-8").read()[:200]
    hf_tokenizer = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    assert hf_tokenizer.encode(text).ids == load_tokenizer(out).encode(text).tolist()


def test_tensor_parallel_checkpoint_resumes_without_tensor_parallelism(corpus, tmp_path, straight, two_step_run):
    moved = str(tmp_path / "moved")
    out, first = two_step_run(TENSOR)
    assert first.exit_code == 0, first.output
    shutil.copytree(out, moved)
    result = train(["--resume"], corpus, moved, 4)
    assert result.exit_code == 0, result.output
    a, b = straight, GPT.from_pretrained(moved).params
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-7, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("args,message", [
    (["--nproc", "3", "--dp", "2"], "--nproc"),
    (["--nproc", "2", "--tp", "2", "--n-head", "3"], "--n-head 3"),
    (["--nproc", "4", "--pp", "4", "--n-layer", "2"], "layer"),
    (["--nproc", "2", "--dp", "2", "--batch-size", "5"], "divisible"),
    (["--nproc", "2", "--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2", "--microbatches", "3"],
     "multiple"),
    (["--nproc", "2", "--pp", "2", "--split", "2,1"], "split"),
    (["--nproc", "2", "--pp", "2", "--split", "a,b"], "--split"),
    # flags that would do nothing in the layout are refused, not silently dropped
    (["--nproc", "2", "--dp", "2", "--sequence-parallel"], "--sequence-parallel"),
    (["--nproc", "1", "--sequence-parallel"], "--sequence-parallel"),
    (["--nproc", "2", "--tp", "2", "--zero", "1"], "--zero"),
    (["--nproc", "1", "--zero", "1"], "--zero"),
    (["--nproc", "2", "--dp", "2", "--schedule", "zb-h1"], "--schedule"),
    (["--nproc", "1", "--virtual-stages", "2"], "--virtual-stages"),
    (["--nproc", "2", "--tp", "2", "--split", "1,1"], "--split"),
])
def test_bad_layouts_fail_in_one_line_before_any_worker_starts(corpus, tmp_path, args, message):
    out = tmp_path / "run"
    flags = list(args)
    if "--n-head" in flags or "--n-layer" in flags or "--batch-size" in flags or "--microbatches" in flags:
        result = CliRunner().invoke(main, ["train", "--data", corpus, "--out", str(out), "--block-size", "8",
                                           "--n-embd", "12", "--steps", "1", *flags])
    else:
        result = train(flags, corpus, str(out), 2)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if not line.endswith(" ...")]  # minus status lines
    assert message in result.output and len(lines) == 1, result.output
    assert not out.exists() or not any(out.iterdir())


def test_resume_with_another_layout_continues_exactly(corpus, tmp_path, straight, two_step_run):
    moved = str(tmp_path / "moved")  # pp 2, then dp 2: the weights of 4 steps in one process
    out, first = two_step_run(PIPELINE)
    assert first.exit_code == 0, first.output
    shutil.copytree(out, moved)
    result = train(["--resume", "--nproc", "2", "--dp", "2"], corpus, moved, 4)
    assert result.exit_code == 0, result.output
    a, b = straight, GPT.from_pretrained(moved).params
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-7, atol=1e-9, err_msg=name)


def test_overwrite_replaces_an_earlier_run_and_refuses_resume(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert train([], corpus, out, 1).exit_code == 0
    assert train([], corpus, out, 1).exit_code != 0  # refuses to clobber without --overwrite
    result = train(["--overwrite"], corpus, out, 2)
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [line.count('"step"') for line in f] == [1, 1]
    result = train(["--overwrite", "--resume"], corpus, out, 3)
    assert result.exit_code != 0 and "--overwrite" in result.output


@pytest.mark.timeout(120)
def test_a_traced_resume_at_fewer_ranks_leaves_only_its_own_traces(corpus, tmp_path):
    out = str(tmp_path / "run")
    assert train(["--nproc", "2", "--pp", "2", "--trace"], corpus, out, 2).exit_code == 0
    assert sorted(f for f in os.listdir(out) if f.startswith("trace-rank")) == ["trace-rank0.json",
                                                                              "trace-rank1.json"]
    result = train(["--resume", "--trace"], corpus, out, 3)
    assert result.exit_code == 0, result.output
    # rank 1 of the two-stage run is gone: it would be summarised beside the new run's rank 0
    assert sorted(f for f in os.listdir(out) if f.startswith("trace-rank")) == ["trace-rank0.json"]


@pytest.mark.timeout(120)
def test_a_traced_pipeline_runs_evaluation_outside_its_step_windows(corpus, tmp_path):
    from ringpipe.tools.trace_io import load_trace
    from ringpipe.tools.trace_summary import summarize

    out = str(tmp_path / "run")
    result = train(["--nproc", "2", "--pp", "2", "--trace", "--eval-every", "1", "--eval-iters", "3"], corpus, out, 2)
    assert result.exit_code == 0, result.output
    summary = summarize(load_trace(out))
    # the distributed evaluation's batches 0..2 are not steps 1..3: only the two training steps are
    assert [step["step"] for step in summary["steps"]] == [1, 2]

"""`ringpipe train --model t5` end to end in one process: span corruption, a checkpoint that
resumes as if never stopped, a model transformers opens, and `ringpipe generate` from it."""
import json

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main

TEXT = "the quick brown fox jumps over the lazy dog and keeps running far away. " * 60
T5_FLAGS = ["--model", "t5", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size",
            "32", "--batch-size", "4", "--eval-iters", "1", "--eval-every", "0", "--seed", "3"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


@pytest.mark.timeout(120)
def test_t5_trains_resumes_as_if_never_stopped_and_generates(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("train", *T5_FLAGS, "--data", data, "--steps", 4, "--out", whole).exit_code == 0
    assert run_cli("train", *T5_FLAGS, "--data", data, "--steps", 2, "--out", split).exit_code == 0
    result = run_cli("train", *T5_FLAGS, "--data", data, "--steps", 4, "--out", split, "--resume")
    assert result.exit_code == 0, result.output
    assert losses(split) == losses(whole)
    config = json.loads((whole / "config.json").read_text())
    assert config["model_type"] == "t5" and config["architectures"] == ["T5ForConditionalGeneration"]
    result = run_cli("generate", "--checkpoint", whole, "--prompt", "the quick", "--max-new-tokens", 5,
                     "--temperature", 0.5)
    assert result.exit_code == 0 and len(result.output.strip("\n")) <= 5 * 12, result.output


def test_a_gpt2_run_is_not_resumed_as_t5(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert run_cli("train", "--data", data, "--n-layer", 1, "--n-head", 2, "--n-embd", 16,
                   "--block-size", 16, "--batch-size", 2, "--steps", 1, "--eval-iters", 1,
                   "--out", out).exit_code == 0
    result = run_cli("train", *T5_FLAGS, "--data", data, "--steps", 2, "--out", out, "--resume")
    assert result.exit_code != 0 and "gpt2" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.timeout(180)
def test_t5_trains_on_an_encoder_stage_and_a_decoder_stage_and_resumes(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    result = run_cli("train", *T5_FLAGS, "--data", data, "--steps", 2, "--out", tmp_path / "pp",
                     "--pp", 2, "--nproc", 2, "--encoder-stages", 1)
    assert result.exit_code == 0, result.output
    assert len(losses(tmp_path / "pp")) == 2
    result = run_cli("train", "--model", "gpt2", "--data", data, "--steps", 3, "--out", tmp_path / "pp",
                     "--pp", 2, "--nproc", 2, "--resume")  # its sharded checkpoint names its family
    assert result.exit_code != 0 and "checkpoint's 't5'" in result.output, result.output
    result = run_cli("train", "--data", data, "--steps", 3, "--out", tmp_path / "pp", "--pp", 2, "--nproc", 2,
                     "--encoder-stages", 1, "--resume")
    assert result.exit_code == 0, result.output
    assert len(losses(tmp_path / "pp")) == 3


def test_encoder_stages_that_leave_the_decoder_no_stage_are_one_line_errors(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    result = run_cli("train", *T5_FLAGS, "--data", data, "--out", tmp_path / "x", "--pp", 2,
                     "--nproc", 2, "--encoder-stages", 2)
    assert result.exit_code != 0
    assert result.output.strip() == ("Error: Invalid value for --encoder-stages: leaves the decoder "
                                     "no stage of the 2 pipeline stages")
    result = run_cli("train", "--data", data, "--out", tmp_path / "y", "--pp", 2, "--nproc", 2,
                     "--encoder-stages", 1)
    assert "applies to an encoder-decoder (--model t5), not gpt2" in result.output

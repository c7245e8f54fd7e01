"""`ringpipe train --model bert` end to end, resume, `ringpipe fill-mask`, the family mismatches, and
every parallel layout equal to one process (float64, like the GPT-2 layouts)."""
import dataclasses
import json

import numpy as np
import pytest

from ringpipe.model.families import family, special_ids
from ringpipe.model.parallel.tensor_parallel import assemble_full_params
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT, one_error_line, run_cli

TINY = ["--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--block-size", 16, "--batch-size", 4, "--eval-iters", 1]
STEPS = 3


@pytest.mark.parametrize("flags", [["--tokenizer", "byte"], ["--tokenizer", "bpe", "--vocab-size", 300],
                                   ["--tokenizer", "byte", "--next-sentence"]], ids=["byte", "bpe", "byte-nsp"])
def test_train_model_bert_end_to_end_then_fill_mask(corpus, tmp_path, flags):
    out = tmp_path / "run"
    result = run_cli("train", "--model", "bert", "--data", corpus, "--out", out, "--steps", 2, *TINY, *flags)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["config"]["family"] == "bert"
    architecture = "BertForPreTraining" if "--next-sentence" in flags else "BertForMaskedLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    result = run_cli("fill-mask", "--checkpoint", out, "--top-k", 3, "1 [MASK] pigs")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "[MASK] 1:" and len(lines) == 4
    probabilities = [float(line.split()[0]) for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1


def bert_config(tmp_path, **overrides) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    settings = dict(family="bert", data=str(corpus), tokenizer="byte", n_layer=4, n_head=2, n_embd=16, block_size=12,
                    batch_size=8, microbatches=2, steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1,
                    dtype="float64", grad_clip=0.5)
    return TrainConfig(**{**settings, **overrides})


def test_a_resumed_bert_run_equals_the_uninterrupted_one(tmp_path):
    config = bert_config(tmp_path, n_layer=1, dropout=0.1)
    straight = Trainer.create(config, str(tmp_path / "straight"))
    for step in range(STEPS):
        straight.train_step(step)
    first = Trainer.create(config, str(tmp_path / "resumed"))
    first.train_step(0)
    first.save_checkpoint()
    resumed = Trainer.resume(config, str(tmp_path / "resumed"))
    for step in range(1, STEPS):
        resumed.train_step(step)
    for name, value in straight.params_on_host().items():
        np.testing.assert_array_equal(resumed.params_on_host()[name], value, err_msg=name)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpt2")
    (tmp_path / "corpus.txt").write_text(TEXT)
    out = tmp_path / "run"
    result = run_cli("train", "--data", tmp_path / "corpus.txt", "--out", out, "--steps", 1, *TINY)
    assert result.exit_code == 0, result.output
    return out


def test_resuming_a_gpt2_run_as_bert_is_a_one_line_error(gpt2_run):
    result = run_cli("train", "--model", "bert", "--resume", "--out", gpt2_run, "--steps", 2)
    assert one_error_line(result) == ("Error: Invalid value for --model: 'bert' differs from the checkpoint's "
                                      "'gpt2'; it cannot change on --resume")


def test_a_trainer_of_one_family_refuses_a_checkpoint_of_another(gpt2_run):
    config = TrainConfig(family="bert", data=str(gpt2_run.parent / "corpus.txt"), n_layer=1, n_head=2, n_embd=16,
                         block_size=16, batch_size=4)
    with pytest.raises(ValueError, match=r"holds a gpt2 model, not bert \(--model bert\)"):
        Trainer.resume(config, str(gpt2_run))


def test_fill_mask_refuses_a_gpt2_model_in_one_line(gpt2_run):
    result = run_cli("fill-mask", "--checkpoint", gpt2_run, "a [MASK]")
    assert one_error_line(result) == (f"Error: Invalid value for --checkpoint: {gpt2_run} holds a gpt2 model; "
                                      "fill-mask needs a bert model")


def test_generate_refuses_a_bert_model_in_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--model", "bert", "--data", corpus, "--out", out, "--steps", 1, *TINY).exit_code == 0
    assert one_error_line(run_cli("generate", "--checkpoint", out)) == (
        f"Error: Invalid value for --checkpoint: {out} holds a bert model, which does not generate text "
        "(ringpipe fill-mask predicts its masked tokens)")


def test_sampling_text_from_bert_is_refused_in_one_line(corpus, tmp_path):
    result = run_cli("train", "--model", "bert", "--data", corpus, "--out", tmp_path / "run", "--sample", 5, *TINY)
    assert one_error_line(result) == ("Error: Invalid value for --sample: needs a model that generates text; "
                                      "a bert model does not")


def train_reference(tmp_path, **overrides):
    config = bert_config(tmp_path, **overrides)
    trainer = Trainer.create(config, str(tmp_path / "run"))
    for step in range(STEPS):
        trainer.train_step(step)
    return config, str(tmp_path / "run" / "tokens.bin"), trainer.tokenizer, trainer.params_on_host()


@pytest.fixture(scope="module")
def bert_reference(tmp_path_factory):
    return train_reference(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def next_sentence_reference(tmp_path_factory):
    return train_reference(tmp_path_factory.mktemp("bert-nsp"), next_sentence=True)


def assert_layout_trains_as_one_process(local_cluster, reference, layout):
    config, token_file, tokenizer, expected = reference
    layout = Layout(**layout)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout), token_file, tokenizer.vocab_size,
        special_ids=special_ids(tokenizer, family("bert")))
    for step in range(STEPS):
        trainers.train_step(step).result()
    got = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)


def layout_id(layout: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in layout.items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [dict(dp=2, zero=1), dict(tp=2), dict(dp=2, tp=2, sequence_parallel=True),
                                    dict(pp=2, schedule="gpipe"), dict(pp=2, schedule="1f1b"),
                                    dict(pp=2, schedule="interleaved", virtual_stages=2),
                                    dict(pp=2, schedule="zb-h1")], ids=layout_id)
def test_every_parallel_layout_trains_bert_as_one_process(local_cluster, bert_reference, layout):
    assert_layout_trains_as_one_process(local_cluster, bert_reference, layout)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [dict(dp=2, tp=2, sequence_parallel=True), dict(pp=2, schedule="1f1b")],
                         ids=layout_id)
def test_the_next_sentence_head_trains_in_parallel_as_in_one_process(local_cluster, next_sentence_reference, layout):
    assert_layout_trains_as_one_process(local_cluster, next_sentence_reference, layout)


def test_next_sentence_is_refused_for_gpt2_in_one_line(corpus, tmp_path):
    result = run_cli("train", "--next-sentence", "--data", corpus, "--out", tmp_path / "run", *TINY)
    assert one_error_line(result) == "Error: Invalid value for --next-sentence: is not an option of --model gpt2"

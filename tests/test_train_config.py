"""TrainConfig: the model's options are named once and reach the model; saved configs load back."""
import dataclasses
import json

import pytest

from ringpipe.model.gpt2.config import GPTConfig, GPTOptions
from ringpipe.model.training.config import MODEL_OPTIONS, TrainConfig, small_gpt
from ringpipe.model.training.run_dir import saved_config, saved_step

# The fields GPTConfig takes from the run rather than from its options: TrainConfig.dtype is the
# run's precision recipe ("fp16-mixed"), the model's is the array dtype it implies; the device is
# where all of the run's arrays live.
FROM_THE_RUN = {"dtype", "device"}


def test_every_model_option_of_a_run_reaches_the_model_config():
    changed = {"n_layer": 3, "n_head": 2, "n_embd": 24, "block_size": 16, "dropout": 0.25, "recompute": True,
               "n_inner": 40, "layer_norm_epsilon": 1e-6, "scale_attn_weights": False,
               "scale_attn_by_inverse_layer_idx": True}
    assert set(changed) == set(MODEL_OPTIONS)
    model = TrainConfig(**changed, device="cpu").gpt_config(vocab_size=70)
    assert {name: getattr(model, name) for name in MODEL_OPTIONS} == changed
    assert model.vocab_size == 70 and model.device == "cpu"


def test_the_model_options_are_named_once():
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not run_fields & set(MODEL_OPTIONS)
    assert run_fields & {f.name for f in dataclasses.fields(GPTConfig)} == FROM_THE_RUN
    assert {f.name for f in dataclasses.fields(GPTConfig)} == set(MODEL_OPTIONS) | FROM_THE_RUN | {"vocab_size"}


def test_flat_model_options_go_into_the_model():
    nested = TrainConfig(model=dataclasses.replace(small_gpt(), n_layer=2), steps=5)
    assert TrainConfig(n_layer=2, steps=5) == nested
    assert TrainConfig(model=GPTOptions(n_layer=7), n_layer=2).model.n_layer == 2  # the flat one wins
    assert dataclasses.replace(nested, n_head=2).model == dataclasses.replace(small_gpt(), n_layer=2, n_head=2)
    assert TrainConfig(**dataclasses.asdict(nested)) == nested  # as trainer.json and the workers carry it
    assert TrainConfig(**nested.flat()) == nested


def test_the_model_dtype_follows_the_runs_precision():
    assert TrainConfig(dtype="fp16-mixed").gpt_config(vocab_size=70).dtype == "float16"
    assert TrainConfig(dtype="float64").gpt_config(vocab_size=70).dtype == "float64"


def test_a_trainer_json_written_before_the_epoch_sampler_loads(tmp_path):
    # As written by an early version: flat fields, no "sampler", "dtype" or "on_nonfinite".
    old = {"step": 40, "config": {
        "data": "corpus.txt", "tokenizer": "char", "n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8,
        "batch_size": 4, "microbatches": 1, "steps": 40, "lr": 0.001, "min_lr": 0.0001, "warmup": 0,
        "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-08, "grad_clip": 1.0, "dropout": 0.0,
        "seed": 0, "val_fraction": 0.1, "eval_every": 0, "eval_iters": 2, "checkpoint_every": 0, "device": "cpu"}}
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer.json").write_text(json.dumps(old, indent=1))
    config = saved_config(str(tmp_path))
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd, config.model.block_size) == (2, 2, 16, 8)
    assert config.sampler == "random" and config.dtype == "float32"  # what that version did
    assert config.gpt_config(vocab_size=30).n_embd == 16
    assert saved_step(str(tmp_path)) == 40


def test_an_unknown_setting_is_named():
    with pytest.raises(TypeError, match="'n_layers'"):
        TrainConfig(n_layers=2)

"""TrainConfig: the model's options are named once and reach the model; saved configs load back."""
import dataclasses
import json

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.training.config import MODEL_OPTIONS, TrainConfig
from ringpipe.model.training.run_dir import saved_config, saved_step

# TrainConfig.dtype is the run's precision recipe ("fp16-mixed"), not the model's array dtype.
SAME_NAME_OTHER_MEANING = {"dtype"}


def test_every_model_option_of_a_run_reaches_the_model_config():
    changed = {"n_layer": 3, "n_head": 2, "n_embd": 24, "block_size": 16, "dropout": 0.25, "device": "cpu"}
    assert set(changed) == set(MODEL_OPTIONS)
    model = TrainConfig(**changed).gpt_config(vocab_size=70)
    assert {name: getattr(model, name) for name in MODEL_OPTIONS} == changed
    assert model.vocab_size == 70


def test_a_field_the_run_shares_with_the_model_is_a_model_option():
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(GPTConfig)}
    assert shared - SAME_NAME_OTHER_MEANING == set(MODEL_OPTIONS)


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
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (2, 2, 16, 8)
    assert config.sampler == "random" and config.dtype == "float32"  # what that version did
    assert config.gpt_config(vocab_size=30).n_embd == 16
    assert saved_step(str(tmp_path)) == 40

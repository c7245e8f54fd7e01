"""Checkpoints: round trip, both key styles, damaged files, and interchange with transformers."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11)
IDX = np.random.default_rng(0).integers(0, 11, (2, 8))


class FakeTokenizer:
    def save(self, directory):
        with open(os.path.join(directory, "tokenizer.json"), "w") as f:
            f.write("{}")


def saved(tmp_path, dtype="float32", **changes):
    gpt = GPT(GPTConfig(**{**TINY, **changes}, dtype=dtype), seed=3)
    directory = tmp_path / "ckpt"
    gpt.save_pretrained(directory)
    return gpt, directory


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_keeps_params_config_and_dtype(tmp_path, dtype):
    gpt, directory = saved(tmp_path, dtype, dropout=0.1)
    loaded = GPT.from_pretrained(directory)
    assert loaded.config == gpt.config
    for name, p in gpt.params.items():
        assert loaded.params[name].dtype == p.dtype
        np.testing.assert_array_equal(loaded.params[name], p)


def test_dtype_can_be_chosen_when_loading(tmp_path):
    gpt, directory = saved(tmp_path, "float64")
    loaded = GPT.from_pretrained(directory, dtype="float32")
    assert loaded.params["wte.weight"].dtype == np.float32
    np.testing.assert_allclose(loaded.forward(IDX), gpt.forward(IDX), rtol=1e-4, atol=1e-5)


def test_file_uses_transformers_keys_and_config(tmp_path):
    _, directory = saved(tmp_path)
    keys = set(load_file(directory / "model.safetensors"))
    assert "transformer.h.1.attn.c_attn.weight" in keys and "lm_head.weight" not in keys
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_positions"], config["n_embd"], config["vocab_size"]) == (8, 16, 11)
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5


def test_tokenizer_is_saved_alongside(tmp_path):
    gpt = GPT(GPTConfig(**TINY))
    gpt.save_pretrained(tmp_path / "ckpt", tokenizer=FakeTokenizer())
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no staging directory left behind


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    _, directory = saved(tmp_path)
    other = GPT(GPTConfig(**TINY), seed=99)
    other.save_pretrained(directory)
    np.testing.assert_array_equal(GPT.from_pretrained(directory).params["wte.weight"],
                                  other.params["wte.weight"])
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("style", ["bare", "lm_head", "buffers"])
def test_reads_both_key_styles(tmp_path, style):
    gpt, directory = saved(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    if style == "bare":
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    elif style == "lm_head":
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    else:
        tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((8, 8), np.float32))
        tensors["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, directory / "model.safetensors")
    np.testing.assert_array_equal(GPT.from_pretrained(directory).forward(IDX), gpt.forward(IDX))


def test_missing_files_raise_file_not_found_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        GPT.from_pretrained(tmp_path / "nowhere")
    _, directory = saved(tmp_path)
    os.remove(directory / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT.from_pretrained(directory)


@pytest.mark.parametrize("damage, file", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00garbage"), "model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:200]), "model.safetensors"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    (lambda d: (d / "config.json").write_text('{"n_layer": 2}'), "config.json"),
])
def test_corrupt_files_raise_value_error_naming_the_file(tmp_path, damage, file):
    _, directory = saved(tmp_path)
    damage(directory)
    with pytest.raises(ValueError, match=file) as info:
        GPT.from_pretrained(directory)
    assert "\n" not in str(info.value)


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    _, directory = saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["n_layer"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_layer 3 contradicts"):
        GPT.from_pretrained(directory)
    del config["ringpipe"]  # a config.json without ringpipe's section: the shapes still decide
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_layer 3 contradicts the record"):
        GPT.from_pretrained(directory)


# ------------------------------------------------------------------ interchange with transformers

def transformers_or_skip():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def test_transformers_opens_a_ringpipe_checkpoint_with_the_same_logits(tmp_path):
    transformers = transformers_or_skip()
    import torch

    gpt, directory = saved(tmp_path, "float64")
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory,
                                                               output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(IDX)).logits.numpy()
    assert logits.dtype == np.float64
    np.testing.assert_allclose(logits, gpt.forward(IDX), rtol=1e-10, atol=1e-10)


def test_a_transformers_checkpoint_opens_in_ringpipe_with_the_same_logits(tmp_path):
    transformers = transformers_or_skip()
    import torch

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8,
                                        vocab_size=11)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = model(torch.from_numpy(IDX)).logits.numpy()
    gpt = GPT.from_pretrained(tmp_path / "hf")
    assert gpt.config.dtype == "float32"
    np.testing.assert_allclose(gpt.forward(IDX), expected, rtol=1e-4, atol=1e-5)

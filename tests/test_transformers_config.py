"""Every option of transformers' GPT2Config either gives GPT2LMHeadModel's logits in ringpipe or is
refused by name when a checkpoint is loaded; none is silently ignored. Compared in float64 (float32
only for reorder_and_upcast_attn, which transformers computes in float32 alone)."""
import dataclasses
import json

import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.gpt2.hf_config import ALIASES, MODEL_KEYS, NO_EFFECT_KEYS, REFUSED_KEYS, TANH_GELU

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.activations")

# Weights drawn wider than GPT-2's 0.02, so that every option moves the logits well above 1e-10.
SHAPE = dict(n_layer=3, n_head=2, n_embd=16, n_positions=8, vocab_size=11, initializer_range=0.3)
IDX = np.random.default_rng(0).integers(0, 11, (2, 8))

# Each GPT2Config / PretrainedConfig attribute -> (what ringpipe does with it, a value to try that is
# not the default). "same": ringpipe's logits equal transformers' with the attribute set (it is
# implemented, or has no effect on GPT2LMHeadModel's logits); "refused": loading names it.
# The summary_* fields configure GPT2DoubleHeadsModel's multiple-choice head, which a
# GPT2LMHeadModel does not have: they are "same" for the LM head model tested here.
ATTRIBUTES = {
    "vocab_size": ("same", 13), "n_positions": ("same", 9), "n_embd": ("same", 12),
    "n_layer": ("same", 2), "n_head": ("same", 4), "n_inner": ("same", 24),
    "layer_norm_epsilon": ("same", 0.3),
    "scale_attn_weights": ("same", False),
    "scale_attn_by_inverse_layer_idx": ("same", True),
    "reorder_and_upcast_attn": ("same", True),
    "resid_pdrop": ("refused", 0.3), "embd_pdrop": ("refused", 0.3),
    "attn_pdrop": ("refused", 0.3),
    "activation_function": ("refused", "relu"),
    "tie_word_embeddings": ("refused", False),
    "add_cross_attention": ("refused", True),
    "initializer_range": ("same", 0.5),
    "summary_type": ("same", "mean"), "summary_use_proj": ("same", False),
    "summary_activation": ("same", "tanh"), "summary_proj_to_labels": ("same", False),
    "summary_first_dropout": ("same", 0.5),
    "bos_token_id": ("same", 3), "eos_token_id": ("same", 4), "pad_token_id": ("same", 5),
    "use_cache": ("same", False), "output_attentions": ("same", True),
    "output_hidden_states": ("same", True), "return_dict": ("same", False),
    "chunk_size_feed_forward": ("same", 2), "is_encoder_decoder": ("same", True),
    "id2label": ("same", {0: "A", 1: "B", 2: "C"}), "label2id": ("same", {"A": 0, "B": 1}),
    "problem_type": ("same", "regression"),
    "architectures": ("same", ["GPT2LMHeadModel"]), "_name_or_path": ("same", "somewhere"),
    "transformers_version": ("same", "0.0.1"), "dtype": ("same", "float64"),
    "model_type": ("refused", "gpt_neo"),
}


def installed_attributes() -> set:
    """Every attribute the installed GPT2Config has, its base PretrainedConfig's included."""
    fields = {f.name for cls in (transformers.GPT2Config, transformers.PretrainedConfig)
              if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}
    return fields | set(transformers.GPT2Config().to_dict())


def test_every_attribute_of_the_installed_gpt2_config_is_classified():
    unknown = installed_attributes() - set(ATTRIBUTES)
    assert not unknown, f"GPT2Config attributes nobody has classified: {sorted(unknown)}"


def test_ringpipe_classifies_every_attribute_the_test_knows():
    ringpipe = set(MODEL_KEYS) | set(REFUSED_KEYS) | NO_EFFECT_KEYS
    assert set(ATTRIBUTES) <= ringpipe, sorted(set(ATTRIBUTES) - ringpipe)
    refused_here = {name for name, (kind, _) in ATTRIBUTES.items() if kind == "refused"}
    assert not refused_here & NO_EFFECT_KEYS


def test_every_other_name_of_an_attribute_is_understood():
    assert transformers.GPT2Config.attribute_map == ALIASES


def test_a_config_that_uses_the_other_names_loads_the_same(tmp_path):
    expected = save_transformers_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for alias, key in ALIASES.items():
        config[alias] = config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    np.testing.assert_allclose(GPT.from_pretrained(tmp_path).forward(IDX), expected,
                               rtol=1e-10, atol=1e-10)
    config["n_embd"] = config["hidden_size"] * 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size=16 contradicts n_embd=32"):
        GPT.from_pretrained(tmp_path)


def test_pruned_heads_of_older_transformers_files_are_refused(tmp_path):
    save_transformers_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pruned_heads"] = {"0": [1]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pruned_heads"):
        GPT.from_pretrained(tmp_path)


def save_transformers_model(directory, precision=torch.float64, **attributes):
    """A GPT2LMHeadModel (eager attention: the path where reorder_and_upcast_attn acts) with
    `attributes` set, saved to `directory` -> its logits of IDX."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**SHAPE, **attributes})
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).to(precision).eval()
    with torch.no_grad():
        # Random LayerNorm parameters, so that a wrong epsilon or order shows in the logits.
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(directory)
    with torch.no_grad():
        # return_dict=True: a config's return_dict=False breaks GPT2LMHeadModel's own forward.
        return model(torch.from_numpy(IDX % config.vocab_size), return_dict=True).logits.numpy()


# Attributes set in the saved config.json instead: save_pretrained writes the first three itself,
# and transformers' own GPT2LMHeadModel.forward fails with return_dict=False in its config.
SET_IN_THE_FILE = ("transformers_version", "_name_or_path", "model_type", "return_dict")


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_each_attribute_is_implemented_or_refused_by_name(tmp_path, name):
    kind, value = ATTRIBUTES[name]
    # reorder_and_upcast_attn computes the scores in float32 (and raises in a float64 model):
    # in a float32 model that is what ringpipe computes too.
    dtype = torch.float32 if name == "reorder_and_upcast_attn" else torch.float64
    expected = save_transformers_model(tmp_path, dtype,
                                       **({} if name in SET_IN_THE_FILE else {name: value}))
    if name in SET_IN_THE_FILE:
        config = json.loads((tmp_path / "config.json").read_text())
        config[name] = value
        (tmp_path / "config.json").write_text(json.dumps(config))
    if kind == "refused":
        with pytest.raises(ValueError, match=name):
            GPT.from_pretrained(tmp_path)
        return
    gpt = GPT.from_pretrained(tmp_path)
    assert gpt.config.dtype == str(dtype).removeprefix("torch.")
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(gpt.forward(IDX % gpt.config.vocab_size), expected,
                               rtol=tolerance, atol=tolerance)


def test_checks_fail_on_the_option_that_once_loaded_silently(tmp_path):
    """The issue's case: ringpipe once ignored scale_attn_by_inverse_layer_idx (logits off ~1e-2)."""
    expected = save_transformers_model(tmp_path, scale_attn_by_inverse_layer_idx=True)
    default = save_transformers_model(tmp_path / "default")
    assert np.abs(expected - default).max() > 1e-3  # the option matters at this size
    gpt = GPT.from_pretrained(tmp_path)
    assert gpt.config.scale_attn_by_inverse_layer_idx
    np.testing.assert_allclose(gpt.forward(IDX), expected, rtol=1e-10, atol=1e-10)


ACTIVATIONS = sorted(transformers.activations.ACT2FN)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation_function_matches_or_is_refused_by_name(tmp_path, activation):
    try:
        expected = save_transformers_model(tmp_path, activation_function=activation)
    except Exception as exc:  # one that GPT2MLP cannot build (it needs arguments)
        pytest.skip(f"transformers cannot build GPT-2 with {activation}: {exc}")
    if activation not in TANH_GELU:
        with pytest.raises(ValueError, match=f"activation_function='{activation}'"):
            GPT.from_pretrained(tmp_path)
        return
    np.testing.assert_allclose(GPT.from_pretrained(tmp_path).forward(IDX), expected,
                               rtol=1e-10, atol=1e-10)


OPTIONS = dict(n_inner=24, layer_norm_epsilon=0.3, scale_attn_by_inverse_layer_idx=True)


def test_loss_and_gradients_match_transformers_with_the_options_set(tmp_path):
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    save_transformers_model(tmp_path, scale_attn_weights=False, **OPTIONS, **no_dropout)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64,
                                                         attn_implementation="eager")
    ids = torch.from_numpy(IDX)
    logits = model(ids).logits
    # Cross-entropy in float64 here: transformers' own loss upcasts the logits to float32 only.
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    gpt = GPT.from_pretrained(tmp_path)
    ours, grads = gpt.loss_and_grads(IDX[:, :-1], IDX[:, 1:])
    assert ours == pytest.approx(loss.item(), rel=1e-10)
    theirs = {name.removeprefix("transformer."): p.grad.numpy()
              for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        np.testing.assert_allclose(grad, theirs[name], rtol=1e-8, atol=1e-12, err_msg=name)


def test_sampling_with_the_kv_cache_sees_the_options(tmp_path):
    expected = save_transformers_model(tmp_path, **OPTIONS)
    gpt = GPT.from_pretrained(tmp_path)
    logits, _ = gpt.prefill(IDX)
    np.testing.assert_allclose(logits, expected, rtol=1e-10, atol=1e-10)


def test_transformers_opens_a_ringpipe_checkpoint_with_the_options_set(tmp_path):
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11,
                        dtype="float64", scale_attn_weights=False, **OPTIONS), seed=1)
    gpt.save_pretrained(tmp_path)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(IDX)).logits.numpy()
    np.testing.assert_allclose(logits, gpt.forward(IDX), rtol=1e-10, atol=1e-10)

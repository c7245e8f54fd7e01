"""T5 in transformers' format both ways, and every T5Config field implemented or refused by name.

transformers' T5LayerNorm computes its variance in float32 even for float64 inputs, so whole-model
logits of a float64 T5ForConditionalGeneration differ from an exact float64 computation by that
rounding (~1e-7 relative). Each comparison is made twice: against transformers as it is, at the
precision that rounding allows, and at 1e-10 against transformers with that one rounding removed
(T5LayerNorm computing in its input's dtype, patched for the test)."""
import dataclasses
import json

import numpy as np
import pytest

from ringpipe.model.t5.config import T5Config
from ringpipe.model.t5.hf_config import ALIASES, DERIVED_KEYS, MODEL_KEYS, NO_EFFECT_KEYS, REFUSED_KEYS
from ringpipe.model.t5.model import T5, shift_right

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
t5_modeling = pytest.importorskip("transformers.models.t5.modeling_t5")

SHAPE = dict(vocab_size=29, d_model=12, d_kv=4, d_ff=20, num_layers=2, num_decoder_layers=3,
             num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=10,
             dropout_rate=0.0, decoder_start_token_id=0)
rng = np.random.default_rng(0)
INPUT_IDS = rng.integers(0, 29, (2, 13))  # longer than max_distance: the logarithmic buckets too
LABELS = rng.integers(0, 29, (2, 11))
MASK = np.ones((2, 13), dtype=np.int64)
MASK[1, 9:] = 0


def _exact_forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def exact_layer_norm(monkeypatch):
    """transformers' T5LayerNorm without its float32 variance: computed in the input's dtype."""
    monkeypatch.setattr(t5_modeling.T5LayerNorm, "forward", _exact_forward)


def hf_model(feed_forward_proj="relu", seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.T5Config(**{**SHAPE, "feed_forward_proj": feed_forward_proj, **overrides},
                                   attn_implementation="eager")
    model = transformers.T5ForConditionalGeneration(config).double().eval()
    with torch.no_grad():  # norms away from 1, so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model):
    with torch.no_grad():
        decoder_ids = torch.tensor(shift_right(LABELS, 0, 0))
        return model(input_ids=torch.tensor(INPUT_IDS), attention_mask=torch.tensor(MASK),
                     decoder_input_ids=decoder_ids).logits.numpy()


def ours_logits(model):
    return model.decoder_logits(INPUT_IDS, shift_right(LABELS, 0, 0), MASK)


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_a_transformers_t5_loads_with_the_same_logits(tmp_path, feed_forward_proj, monkeypatch):
    theirs = hf_model(feed_forward_proj)
    theirs.save_pretrained(tmp_path)
    ours = T5.from_pretrained(tmp_path, dtype="float64")
    assert relative_error(ours_logits(ours), hf_logits(theirs)) < 1e-5  # their float32 variance
    monkeypatch.setattr(t5_modeling.T5LayerNorm, "forward", _exact_forward)
    assert relative_error(ours_logits(ours), hf_logits(theirs)) < 1e-10


def test_an_unscaled_t5_v1_1_checkpoint_loads_unscaled(tmp_path, exact_layer_norm):
    theirs = hf_model("gated-gelu", tie_word_embeddings=False)
    assert not theirs.config.scale_decoder_outputs
    theirs.save_pretrained(tmp_path)
    ours = T5.from_pretrained(tmp_path, dtype="float64")
    assert not ours.config.scale_decoder_outputs
    assert relative_error(ours_logits(ours), hf_logits(theirs)) < 1e-10


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_ringpipe_saves_load_in_transformers_with_no_missing_keys_and_the_same_logits(
        tmp_path, feed_forward_proj, exact_layer_norm):
    config = T5Config(**{k: v for k, v in SHAPE.items() if k != "dropout_rate"},
                      feed_forward_proj=feed_forward_proj, dtype="float64")
    ours = T5(config, seed=3)
    ours.save_pretrained(tmp_path)
    theirs, info = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True, dtype=torch.float64)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert relative_error(ours_logits(ours), hf_logits(theirs.eval())) < 1e-10


def test_the_whole_backward_equals_torch_autograd_of_transformers(tmp_path, exact_layer_norm):
    theirs = hf_model("gated-gelu")
    theirs.save_pretrained(tmp_path)
    ours = T5.from_pretrained(tmp_path, dtype="float64")
    labels = LABELS.copy()
    labels[0, -2:] = -100
    loss, grads = ours.seq2seq_loss_and_grads(INPUT_IDS, labels, MASK)
    out = theirs(input_ids=torch.tensor(INPUT_IDS), attention_mask=torch.tensor(MASK),
                 labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(loss - out.loss.item()) < 1e-12
    from ringpipe.model.t5.checkpoint import from_transformers
    theirs_grads = from_transformers({k: p.grad.numpy() for k, p in theirs.named_parameters()},
                                     ours.config, "autograd")
    for name, grad in grads.items():
        assert relative_error(grad, theirs_grads[name]) < 1e-10, name


# ---- every T5Config field -------------------------------------------------------------------

# Each attribute -> (what ringpipe does with it, a value to try that is not the default).
# "same": ringpipe's logits equal transformers' with it set; "refused": loading names it.
ATTRIBUTES = {
    "vocab_size": ("same", 31), "d_model": ("same", 8), "d_kv": ("same", 5), "d_ff": ("same", 7),
    "num_layers": ("same", 1), "num_decoder_layers": ("same", 1), "num_heads": ("same", 2),
    "relative_attention_num_buckets": ("same", 6), "relative_attention_max_distance": ("same", 5),
    "layer_norm_epsilon": ("same", 0.3), "feed_forward_proj": ("same", "gated-gelu"),
    "scale_decoder_outputs": ("same", False), "tie_word_embeddings": ("same", False),
    "dense_act_fn": ("refused", "gelu"), "is_gated_act": ("refused", True),
    "dropout_rate": ("same", 0.3), "classifier_dropout": ("same", 0.3),
    "initializer_factor": ("same", 3.0), "is_encoder_decoder": ("refused", False),
    "is_decoder": ("refused", True), "use_cache": ("same", False),
    "pad_token_id": ("same", 3), "eos_token_id": ("same", 4), "decoder_start_token_id": ("same", 5),
    "output_attentions": ("same", True), "output_hidden_states": ("same", True),
    "chunk_size_feed_forward": ("same", 2),
    "id2label": ("same", {0: "A", 1: "B", 2: "C"}), "label2id": ("same", {"A": 0, "B": 1}),
    "problem_type": ("same", "regression"), "architectures": ("same", ["T5Model"]),
    "_name_or_path": ("same", "somewhere"), "transformers_version": ("same", "0.0.1"),
    "dtype": ("same", "float64"), "model_type": ("refused", "bart"),
}


def installed_attributes() -> set:
    fields = {f.name for cls in (transformers.T5Config, transformers.PretrainedConfig)
              if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}
    return fields | set(transformers.T5Config().to_dict())


def test_every_t5config_attribute_is_classified_and_tested():
    classified = set(MODEL_KEYS) | set(DERIVED_KEYS) | set(REFUSED_KEYS) | NO_EFFECT_KEYS
    assert installed_attributes() <= classified | set(ALIASES), \
        sorted(installed_attributes() - classified - set(ALIASES))
    # Not tried: transformers 5.24's T5 itself fails with return_dict=False (a tuple where it
    # expects its output class); the others are absent from its T5Config.
    assert installed_attributes() - {"return_dict", "bos_token_id", "add_cross_attention",
                                     "pruned_heads", "torch_dtype"} <= set(ATTRIBUTES) | set(ALIASES)


@pytest.mark.parametrize("attribute", sorted(ATTRIBUTES))
def test_a_t5config_attribute_gives_transformers_logits_or_is_refused(tmp_path, attribute,
                                                                       exact_layer_norm):
    expected, value = ATTRIBUTES[attribute]
    theirs = hf_model() if expected == "refused" else hf_model(**{attribute: value})
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved[attribute] = value
    path.write_text(json.dumps(saved))
    if expected == "refused":
        with pytest.raises(ValueError, match=attribute):
            T5.from_pretrained(tmp_path, dtype="float64")
        return
    ours = T5.from_pretrained(tmp_path, dtype="float64")
    vocab = ours.config.vocab_size
    ids, labels = INPUT_IDS % vocab, LABELS % vocab
    with torch.no_grad():
        out = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(MASK),
                     decoder_input_ids=torch.tensor(shift_right(labels, 0, 0)), use_cache=False)
    logits = (out[0] if isinstance(out, tuple) else out.logits).numpy()
    assert relative_error(ours.decoder_logits(ids, shift_right(labels, 0, 0), MASK), logits) < 1e-10


def test_an_unsupported_feed_forward_proj_is_refused_by_name(tmp_path):
    hf_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "feed_forward_proj": "gated-silu",
                                "dense_act_fn": "silu", "is_gated_act": True}))
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu' is not supported"):
        T5.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="feed_forward_proj 'silu' is not supported"):
        T5Config(feed_forward_proj="silu")


def test_a_gpt2_checkpoint_is_not_read_as_t5(tmp_path):
    from ringpipe.model.gpt2.config import GPTConfig
    from ringpipe.model.gpt2.model import GPT
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=4, vocab_size=5)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not a T5 checkpoint"):
        T5.from_pretrained(tmp_path)


def test_greedy_generation_equals_transformers_generate(tmp_path, exact_layer_norm):
    config = T5Config(**{k: v for k, v in SHAPE.items() if k != "dropout_rate"}, eos_token_id=None,
                      dtype="float64")
    ours = T5(config, seed=5)
    ours.save_pretrained(tmp_path)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float64)
    # use_cache=False: transformers 5.24's cache fails when the decoder has more layers than the encoder
    with torch.no_grad():
        expected = theirs.eval().generate(torch.tensor(INPUT_IDS), attention_mask=torch.tensor(MASK),
                                          max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                          num_beams=1, use_cache=False).numpy()
    assert ours.generate(INPUT_IDS, 12, attention_mask=MASK).tolist() == expected.tolist()

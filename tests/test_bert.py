"""BERT (model/bert/): transformers' BertForMaskedLM loads with the same logits and ringpipe's saves
load back in transformers; every BertConfig attribute is implemented or refused by name; the
hand-written backward is the loss's gradient (float64)."""
import dataclasses
import json

import numpy as np
import pytest

from ringpipe.model.bert.config import BertConfig, param_shapes
from ringpipe.model.bert.hf_config import MODEL_KEYS, NO_EFFECT_KEYS, REFUSED_KEYS
from ringpipe.model.bert.model import Bert

torch = pytest.importorskip("torch", reason="comparing against transformers needs torch")
transformers = pytest.importorskip("transformers", reason="comparing needs transformers")

SHAPE = dict(vocab_size=23, hidden_size=16, num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=12,
             intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IDX = np.random.default_rng(0).integers(0, 23, (2, 10))


def relative_error(ours, theirs) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def transformers_bert(**overrides):
    """A float64 BertForMaskedLM with every weight drawn at random (not its init's zeros and ones)."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**{**SHAPE, **overrides})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def transformers_logits(model, idx=IDX):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


def test_a_bert_saved_by_transformers_loads_with_the_same_logits(tmp_path):
    model = transformers_bert()
    model.save_pretrained(tmp_path)
    ours = Bert.from_pretrained(tmp_path, dtype="float64")
    assert relative_error(ours.forward(IDX), transformers_logits(model)) <= 1e-10


def test_a_bert_saved_by_ringpipe_loads_in_transformers_with_no_missing_or_unexpected_key(tmp_path):
    config = BertConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=23, n_inner=24, dtype="float64")
    ours = Bert(config, seed=3)
    for p in ours.params.values():  # away from the init's zeros and ones
        p += np.random.default_rng(1).normal(0, 0.3, p.shape)
    ours.save_pretrained(tmp_path)
    theirs, info = transformers.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                dtype=torch.float64)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert relative_error(ours.forward(IDX), transformers_logits(theirs.eval())) <= 1e-10
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


def installed_attributes() -> set:
    fields = {f.name for cls in (transformers.BertConfig, transformers.PretrainedConfig)
              if dataclasses.is_dataclass(cls) for f in dataclasses.fields(cls)}
    return fields | set(transformers.BertConfig().to_dict())


def test_every_attribute_of_the_installed_bert_config_is_classified():
    classified = set(MODEL_KEYS) | set(REFUSED_KEYS) | NO_EFFECT_KEYS
    unknown = installed_attributes() - classified
    assert not unknown, f"BertConfig attributes nobody has classified: {sorted(unknown)}"


@pytest.mark.parametrize("key", sorted(MODEL_KEYS))
def test_every_implemented_attribute_gives_transformers_logits(tmp_path, key):
    changed = {"num_hidden_layers": 1, "num_attention_heads": 4, "hidden_size": 12, "max_position_embeddings": 11,
               "vocab_size": 19, "intermediate_size": 20, "layer_norm_eps": 0.3, "type_vocab_size": 3,
               "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}[key]
    model = transformers_bert(**{key: changed})
    model.save_pretrained(tmp_path)
    idx = IDX % model.config.vocab_size
    assert relative_error(Bert.from_pretrained(tmp_path, dtype="float64").forward(idx),
                          transformers_logits(model, idx)) <= 1e-10


NO_EFFECT_TRIALS = {
    "initializer_range": 0.5, "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2, "classifier_dropout": 0.3,
    "chunk_size_feed_forward": 2, "use_cache": False, "output_attentions": True, "output_hidden_states": True,
    "return_dict": False, "is_encoder_decoder": True, "id2label": {0: "A", 1: "B", 2: "C"}, "label2id": {"A": 0},
    "problem_type": "regression", "architectures": ["BertForMaskedLM"], "_name_or_path": "somewhere",
    "transformers_version": "0.0.1", "dtype": "float64", "torch_dtype": "float64",
}


def test_every_attribute_said_to_have_no_effect_is_tried():
    assert set(NO_EFFECT_TRIALS) == NO_EFFECT_KEYS


@pytest.mark.parametrize("key", sorted(NO_EFFECT_TRIALS))
def test_an_attribute_with_no_effect_on_the_logits_loads_and_gives_transformers_logits(tmp_path, key):
    # transformers returns attention weights from its eager attention only.
    extra = {"attn_implementation": "eager"} if key == "output_attentions" else {}
    model = transformers_bert(**{key: NO_EFFECT_TRIALS[key]}, **extra)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        theirs = model(torch.from_numpy(IDX))[0].numpy()
    assert relative_error(Bert.from_pretrained(tmp_path, dtype="float64").forward(IDX), theirs) <= 1e-10


@pytest.mark.parametrize("key, value", [("hidden_act", "relu"), ("tie_word_embeddings", False), ("is_decoder", True),
                                        ("add_cross_attention", True), ("model_type", "roberta"),
                                        ("position_embedding_type", "relative_key")])
def test_a_config_value_ringpipe_does_not_implement_is_refused_by_name(tmp_path, key, value):
    Bert(BertConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"config.json: {key}={value!r} is not supported"):
        Bert.from_pretrained(tmp_path)


def test_different_dropout_rates_are_refused_by_name(tmp_path):
    Bert(BertConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.1}))
    with pytest.raises(ValueError, match="dropout rates differ"):
        Bert.from_pretrained(tmp_path)


@pytest.mark.parametrize("next_sentence", [False, True], ids=["mlm", "mlm+nsp"])
def test_the_whole_model_gradient_is_the_loss_gradient_in_float64(next_sentence):
    config = BertConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=13, dtype="float64",
                        next_sentence=next_sentence)
    model = Bert(config, seed=1)
    rng = np.random.default_rng(3)
    for p in model.params.values():
        p += rng.normal(0, 0.2, p.shape)
    idx = rng.integers(0, 13, (2, 6))
    targets = np.full((2, 6), -100)
    targets[0, 1], targets[1, 4], targets[1, 2] = 3, 7, 2
    if next_sentence:  # sentence pairs: token types, and the next-sentence labels at [:, 0]
        idx = np.stack([idx, (np.arange(6) >= [[2], [4]]).astype(np.int64)], axis=1)
        targets[:, 0] = [0, 1]
    _, grads = model.loss_and_grads(idx, targets)
    assert sorted(grads) == sorted(param_shapes(config))
    for name, param in model.params.items():
        flat, analytic = param.reshape(-1), grads[name].reshape(-1)
        for k in rng.choice(flat.size, 2, replace=False):
            old = flat[k]
            flat[k] = old + 1e-6
            plus, _ = model.loss_and_grads(idx, targets)
            flat[k] = old - 1e-6
            minus, _ = model.loss_and_grads(idx, targets)
            flat[k] = old
            scale = max(np.abs(analytic).max(), 1e-12)
            assert abs((plus - minus) / 2e-6 - analytic[k]) <= 1e-6 * scale, (name, k)


def transformers_pretraining_bert():
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(transformers.BertConfig(**SHAPE)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_a_bert_for_pretraining_loads_with_the_same_logits_and_loss_both_ways(tmp_path):
    theirs = transformers_pretraining_bert()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = Bert.from_pretrained(tmp_path / "theirs", dtype="float64")
    assert ours.config.next_sentence
    types = (np.arange(10) >= [[4], [7]]).astype(np.int64)
    labels = np.full((2, 10), -100)
    labels[0, 3], labels[1, 8] = 5, 2
    with torch.no_grad():
        out = theirs(torch.from_numpy(IDX), token_type_ids=torch.from_numpy(types), labels=torch.from_numpy(labels),
                     next_sentence_label=torch.tensor([0, 1]))
    pairs, targets = np.stack([IDX, types], axis=1), labels.copy()
    targets[:, 0] = [0, 1]
    assert relative_error(ours.forward(pairs), out.prediction_logits.numpy()) <= 1e-10
    assert relative_error(ours.next_sentence_logits(pairs), out.seq_relationship_logits.numpy()) <= 1e-10
    assert ours.loss(pairs, targets) == pytest.approx(out.loss.item(), rel=1e-12)
    ours.save_pretrained(tmp_path / "ours")
    again, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours", output_loading_info=True,
                                                                  dtype=torch.float64)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = again.eval()(torch.from_numpy(IDX), token_type_ids=torch.from_numpy(types)).prediction_logits
    assert relative_error(ours.forward(pairs), logits.numpy()) <= 1e-10


def test_a_sequence_longer_than_the_position_table_is_one_line():
    model = Bert(BertConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    with pytest.raises(ValueError, match=r"^sequence of 9 tokens is longer than BERT's position table "
                                         r"\(8 positions, --block-size\)$"):
        model.forward(np.zeros((1, 9), dtype=np.int64))


def test_fill_mask_ranks_the_tokens_by_probability():
    model = Bert(BertConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11, dtype="float64"), seed=2)
    ids = np.array([1, 4, 10, 5, 10])
    predictions = model.fill_mask(ids, mask_id=10, top_k=3)
    logits = model.forward(ids[None])[0]
    assert len(predictions) == 2
    for position, candidates in zip((2, 4), predictions):
        assert [token for token, _ in candidates] == list(np.argsort(-logits[position], kind="stable")[:3])
        probs = np.exp(logits[position] - logits[position].max())
        assert candidates[0][1] == pytest.approx(probs.max() / probs.sum())

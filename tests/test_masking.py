"""Masked-LM batches: 15 % of each row chosen, 80/10/10 mask/random/keep, loss only where chosen,
the same batch for the same (seed, step) whatever asks for it, the special tokens in every tokenizer."""
import numpy as np
import pytest

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.data.hf_tokenizer import with_special_tokens
from ringpipe.model.data.masking import (IGNORE_INDEX, SPECIAL_TOKENS, MaskedLM, chosen_per_row, mask_tokens,
                                         sentence_pairs)
from ringpipe.model.data.tokenizer import make_tokenizer
from ringpipe.model.training.config import TrainConfig
from tests.conftest import TEXT

VOCAB = 100
CLS, SEP, MASK, PAD = 96, 97, 98, 99
ORDINARY = np.arange(96)


def masked(rows=4000, length=40, seed=0):
    window = np.random.default_rng(seed).integers(0, 96, (rows, length))
    inputs, targets = mask_tokens(window, CLS, SEP, MASK, ORDINARY, np.random.default_rng([seed, 1]))
    return window, inputs, targets


def test_each_row_has_15_percent_of_its_tokens_chosen_and_never_cls_or_sep():
    window, inputs, targets = masked()
    chosen = targets != IGNORE_INDEX
    assert chosen_per_row(40) == 6 and (chosen.sum(1) == 6).all()
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert (inputs[:, 0] == CLS).all() and (inputs[:, -1] == SEP).all()


def test_chosen_tokens_are_80_percent_masked_10_random_10_kept_and_targets_are_the_originals():
    window, inputs, targets = masked()
    chosen = targets != IGNORE_INDEX
    original = np.pad(window, ((0, 0), (1, 1)))
    assert (targets[chosen] == original[chosen]).all()
    inner = ~chosen[:, 1:-1]
    assert (inputs[:, 1:-1][inner] == window[inner]).all()  # tokens not chosen are untouched
    is_mask = inputs[chosen] == MASK
    kept = inputs[chosen] == original[chosen]
    random = ~is_mask & ~kept
    n = chosen.sum()
    assert is_mask.sum() / n == pytest.approx(0.8, abs=0.01)
    # A random replacement may draw the original token (1 in 96): it then counts as kept.
    assert random.sum() / n == pytest.approx(0.1 * 95 / 96, abs=0.01)
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 96, abs=0.01)
    assert np.isin(inputs[chosen][random], ORDINARY).all()  # never a special token


def test_a_batch_is_a_function_of_seed_step_and_split(tmp_path):
    config = TrainConfig(family="bert", block_size=16, batch_size=8, seed=5)
    dataset = TokenDataset(np.random.default_rng(0).integers(0, 96, 2000))
    objective = MaskedLM(config, VOCAB, {"cls_token": CLS, "sep_token": SEP, "mask_token": MASK, "pad_token": PAD})
    first = objective.batch(dataset, "train", 3)
    again = MaskedLM(config, VOCAB, {"cls_token": CLS, "sep_token": SEP, "mask_token": MASK,
                                     "pad_token": PAD}).batch(dataset, "train", 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape == first[1].shape == (8, 16)
    assert not np.array_equal(first[1], objective.batch(dataset, "train", 4)[1])
    assert not np.array_equal(first[1], objective.batch(dataset, "val", 3)[1])


def test_the_objective_needs_room_for_a_token_and_the_special_tokens():
    ids = {"cls_token": CLS, "sep_token": SEP, "mask_token": MASK, "pad_token": PAD}
    with pytest.raises(ValueError, match="block_size 2 leaves no room"):
        MaskedLM(TrainConfig(family="bert", block_size=2), VOCAB, ids)
    with pytest.raises(ValueError, match="lacks the special token.*mask_token"):
        MaskedLM(TrainConfig(family="bert", block_size=8), VOCAB,
                 {"cls_token": CLS, "sep_token": SEP, "pad_token": PAD})


def test_sentence_pairs_are_cls_a_sep_b_sep_with_half_of_b_from_elsewhere():
    tokens = np.random.default_rng(4).integers(0, 96, 5000)
    starts = np.random.default_rng(5).integers(0, 5000 - 30, 2000)
    window = tokens[starts[:, None] + np.arange(30)]
    pairs, targets = sentence_pairs(window, tokens, CLS, SEP, MASK, ORDINARY, np.random.default_rng(6))
    inputs, types = pairs[:, 0], pairs[:, 1]
    assert inputs.shape == types.shape == targets.shape == (2000, 33)
    assert (inputs[:, 0] == CLS).all() and (inputs[:, -1] == SEP).all()
    assert ((inputs == SEP).sum(1) >= 2).all()
    cut = (types == 0).sum(1) - 2  # A's length: type 0 covers [CLS] A [SEP]
    assert (cut >= 1).all() and (cut <= 29).all()  # B has at least one token
    assert (inputs[np.arange(2000), cut + 1] == SEP).all()
    assert ((types[:, 1:] >= types[:, :-1]).all() and (types[:, -1] == 1).all())
    label = targets[:, 0]
    assert set(np.unique(label)) == {0, 1} and label.mean() == pytest.approx(0.5, abs=0.05)
    content = targets[:, 1:].copy()  # masked-LM targets: chosen_per_row(30) per row, never [CLS] or [SEP]
    assert ((content != IGNORE_INDEX).sum(1) == chosen_per_row(30)).all()
    assert (targets[inputs == SEP] == IGNORE_INDEX).all()
    original = np.where(targets != IGNORE_INDEX, targets, inputs)
    for row in np.flatnonzero(label == 0)[:50]:  # B continues A: the window itself
        b = original[row, cut[row] + 2:-1]
        np.testing.assert_array_equal(np.concatenate([original[row, 1:cut[row] + 1], b]), window[row])


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_every_tokenizer_gets_the_special_tokens_whole_after_its_own(kind):
    base = make_tokenizer(kind, TEXT, 300 if kind == "bpe" else None)
    tokenizer = with_special_tokens(base, SPECIAL_TOKENS)
    ids = [tokenizer.token_id(token) for token in SPECIAL_TOKENS.values()]
    assert sorted(ids) == list(range(base.vocab_size, base.vocab_size + 4))
    assert tokenizer.encode("1 little [MASK] went").tolist() == [
        *base.encode("1 little ").tolist(), tokenizer.token_id("[MASK]"), *base.encode(" went").tolist()]

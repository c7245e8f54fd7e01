"""Masked-LM batches: 15 % of each row chosen, 80/10/10 mask/random/keep, loss only where chosen,
the same batch for the same (seed, step) whatever asks for it, the special tokens in every tokenizer."""
import numpy as np
import pytest

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.data.hf_tokenizer import with_special_tokens
from ringpipe.model.data.masking import IGNORE_INDEX, SPECIAL_TOKENS, MaskedLM, chosen_per_row, mask_tokens
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
        MaskedLM(TrainConfig(family="bert", block_size=8), VOCAB, {"cls_token": CLS, "sep_token": SEP, "pad_token": PAD})


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_every_tokenizer_gets_the_special_tokens_whole_after_its_own(kind):
    base = make_tokenizer(kind, TEXT, 300 if kind == "bpe" else None)
    tokenizer = with_special_tokens(base, SPECIAL_TOKENS)
    ids = [tokenizer.token_id(token) for token in SPECIAL_TOKENS.values()]
    assert sorted(ids) == list(range(base.vocab_size, base.vocab_size + 4))
    assert tokenizer.encode("1 little [MASK] went").tolist() == [
        *base.encode("1 little ").tolist(), tokenizer.token_id("[MASK]"), *base.encode(" went").tolist()]

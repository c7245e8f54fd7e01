"""T5's span corruption: density, span count, sentinels, fixed lengths, determinism per (seed, step)."""
import numpy as np

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.data.hf_tokenizer import with_special_tokens
from ringpipe.model.data.span_corruption import (T5_ROLES, SpanCorruption, corrupt,
                                                 corrupted_lengths, noise_counts, noise_mask,
                                                 sentinel_tokens)
from ringpipe.model.data.tokenizer import make_tokenizer


def test_fifteen_percent_noise_in_spans_of_three_on_average():
    assert noise_counts(100) == (15, 5)
    assert corrupted_lengths(100) == (100 - 15 + 5 + 1, 15 + 5 + 1)
    for seed in range(20):
        mask = noise_mask(100, np.random.default_rng(seed))
        assert mask.sum() == 15 and not mask[0]
        assert np.count_nonzero(np.diff(mask.astype(int)) == 1) == 5  # five separate spans


def test_inputs_hide_each_span_behind_a_sentinel_that_the_targets_spell_out():
    window = np.arange(10, 18)
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    inputs, targets = corrupt(window, mask, [100, 101, 102], eos_id=1)
    assert inputs.tolist() == [10, 11, 100, 14, 15, 101, 17, 1]
    assert targets.tolist() == [100, 12, 13, 101, 16, 1]


def test_batches_are_a_function_of_seed_and_step_with_fixed_lengths():
    text = "the quick brown fox jumps over the lazy dog. " * 20
    tokenizer = with_special_tokens(make_tokenizer("char", text), T5_ROLES, sentinel_tokens(100))
    dataset = TokenDataset(tokenizer.encode(text), 0.2)
    data = SpanCorruption.for_tokenizer(tokenizer, 40)
    inputs, targets = data.get_batch(dataset, "train", 3, 4, 40, seed=7)
    assert inputs.shape == (4, corrupted_lengths(40)[0]) and targets.shape == (4, corrupted_lengths(40)[1])
    again = data.get_batch(dataset, "train", 3, 4, 40, seed=7)
    assert np.array_equal(inputs, again[0]) and np.array_equal(targets, again[1])
    assert not np.array_equal(targets, data.get_batch(dataset, "train", 4, 4, 40, seed=7)[1])
    sentinel = tokenizer.token_id("<extra_id_0>")
    assert (inputs == sentinel).sum(axis=1).tolist() == [1] * 4 and (targets[:, 0] == sentinel).all()
    assert "<extra_id_1>" in tokenizer.decode(targets[0]) and tokenizer.decode(targets[0]).endswith("</s>")

"""T5's span-corruption objective: noise spans replaced by sentinels in the input, the target
spelling out each sentinel and the tokens it hid.

From a window of `length` tokens, round(length × noise_density) are noise (at least 1, at most
length − 1), in round(noise / mean_span_length) spans (at least 1); noise and kept tokens are each
split into that many non-empty runs at random, and the window alternates kept, noise, kept, …
(T5's random_spans_noise_mask). So every window of a length gives inputs and targets of the same
lengths (`corrupted_lengths`) and batches need no padding:

    window   a b c d e f g h
    inputs   a b <extra_id_0> e f <extra_id_1> h </s>
    targets  <extra_id_0> c d <extra_id_1> g </s>

The decoder reads the targets shifted right (teacher forcing, model/t5/model.py). A batch is a
pure function of (seed, step, split): the windows are TokenDataset's, the noise of each row is drawn
from (seed, step, split, row), whatever the layout that consumes it.
"""
from __future__ import annotations

import numpy as np

NOISE_DENSITY = 0.15
MEAN_SPAN_LENGTH = 3.0
SENTINEL = "<extra_id_{}>"
T5_ROLES = {"pad_token": "<pad>", "eos_token": "</s>"}


def sentinel_tokens(count: int) -> list[str]:
    """T5's sentinel texts <extra_id_0> … <extra_id_{count-1}>, for `with_special_tokens`."""
    return [SENTINEL.format(i) for i in range(count)]


def noise_counts(length: int, noise_density: float = NOISE_DENSITY,
                 mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """-> (noise tokens, noise spans) of a window of `length` tokens."""
    if length < 2:
        raise ValueError(f"span corruption needs windows of at least 2 tokens, got {length}")
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return noise, max(int(round(noise / mean_span_length)), 1)


def corrupted_lengths(length: int, noise_density: float = NOISE_DENSITY,
                      mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[int, int]:
    """-> (input length, target length) of a window of `length` tokens, both with the EOS."""
    noise, spans = noise_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def _random_segmentation(total: int, parts: int, rng) -> np.ndarray:
    """`total` items cut into `parts` non-empty runs at random -> the run lengths."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, rng, noise_density: float = NOISE_DENSITY,
               mean_span_length: float = MEAN_SPAN_LENGTH) -> np.ndarray:
    """bool (length,): True on noise tokens; starts with a kept run (T5's random_spans_noise_mask)."""
    noise, spans = noise_counts(length, noise_density, mean_span_length)
    if length - noise < spans:  # too few kept tokens to separate the spans
        spans = length - noise
    noise_runs = _random_segmentation(noise, spans, rng)
    kept_runs = _random_segmentation(length - noise, spans, rng)
    runs = np.stack([kept_runs, noise_runs], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), runs)


def corrupt(window, mask, sentinel_ids, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """window int (L,), mask bool (L,) -> (inputs, targets): each noise span becomes the next
    sentinel in the inputs; the targets hold each sentinel then the tokens it replaced."""
    window, mask = np.asarray(window, dtype=np.int64), np.asarray(mask, dtype=bool)
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    if len(starts) > len(sentinel_ids):
        raise ValueError(f"{len(starts)} noise spans need as many sentinels, the tokenizer has "
                         f"{len(sentinel_ids)}")
    sentinels = np.asarray(sentinel_ids[:len(starts)], dtype=np.int64)
    kept_before = np.cumsum(~mask) - ~mask  # kept tokens before each position
    noise_before = np.cumsum(mask) - mask
    inputs = np.insert(window[~mask], kept_before[starts], sentinels)
    targets = np.insert(window[mask], noise_before[starts], sentinels)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


class SpanCorruption:
    """Span-corrupted batches of a TokenDataset for T5: `get_batch` -> (inputs, targets)."""

    def __init__(self, sentinel_ids, eos_id: int, noise_density: float = NOISE_DENSITY,
                 mean_span_length: float = MEAN_SPAN_LENGTH):
        self.sentinel_ids, self.eos_id = list(sentinel_ids), eos_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    @classmethod
    def for_tokenizer(cls, tokenizer, length: int) -> "SpanCorruption":
        """Sentinels and EOS by their texts in `tokenizer` (see `with_special_tokens`)."""
        spans = noise_counts(length)[1]
        return cls([tokenizer.token_id(t) for t in sentinel_tokens(spans)],
                   tokenizer.token_id(T5_ROLES["eos_token"]))

    def lengths(self, length: int) -> tuple[int, int]:
        return corrupted_lengths(length, self.noise_density, self.mean_span_length)

    def get_batch(self, dataset, split: str, step: int, batch_size: int, length: int, seed: int,
                  sampler: str = "epoch"):
        """The global batch of `step`: inputs (B, Li), targets (B, Lt) int64, from windows of
        `length` tokens; Li, Lt = `lengths(length)`."""
        windows, _ = dataset.get_batch(split, step, batch_size, length, seed, sampler)
        split_index = ("train", "val").index(split)
        pairs = [corrupt(row, noise_mask(length, np.random.default_rng([seed, step, split_index, r]),
                                         self.noise_density, self.mean_span_length),
                         self.sentinel_ids, self.eos_id) for r, row in enumerate(windows)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

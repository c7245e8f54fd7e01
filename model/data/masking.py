"""Masked-LM batches (BERT's objective): rows `[CLS] tokens [SEP]`, 15 % of the tokens chosen, each
chosen one replaced by the mask token (80 %), a random token (10 %) or kept (10 %), and predicted.
With the next-sentence objective the rows are sentence pairs `[CLS] A [SEP] B [SEP]` (token types 0
then 1), A and B cut at a random point of a window of text, and in half of the rows B replaced by
text from a random place; the label (1: B is random) rides in targets[:, 0], the inputs are then
(B, 2, T) token ids and token types.

As in BERT's and Megatron-LM's data pipelines, every row gets the same number of chosen positions,
round(0.15 × its tokens) (at least one): the loss of a batch is then the mean of its rows' means, so
the micro-batches and data-parallel shards of any layout average to the same loss and gradient.
The targets hold the original token at chosen positions and -100 (no loss) everywhere else.

Everything is a function of (seed, index, split): the token windows come from
`TokenDataset.get_batch`, the choices from a generator seeded with them, so every layout and a
resumed run see the same batches.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.data.dataset import SPLITS

MASK_PROBABILITY = 0.15
REPLACE_WITH_MASK, REPLACE_WITH_RANDOM = 0.8, 0.1  # the rest of the chosen tokens are kept
IGNORE_INDEX = -100
# The special tokens the objective needs in every tokenizer (transformers' role -> text).
SPECIAL_TOKENS = {"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}


def chosen_per_row(tokens: int) -> int:
    """How many of a row's `tokens` maskable tokens are chosen."""
    return max(1, int(round(tokens * MASK_PROBABILITY)))


class MaskedLM:
    """The masked-LM objective of a run: `batch(dataset, split, index)` -> (inputs, targets).

    config: the TrainConfig (batch_size, model.block_size and model.next_sentence, seed, sampler);
    vocab_size: the tokenizer's; special_ids: {role: id} holding at least SPECIAL_TOKENS' roles."""

    def __init__(self, config, vocab_size: int, special_ids: dict):
        missing = sorted(set(SPECIAL_TOKENS) - set(special_ids))
        if missing:
            raise ValueError(f"masked LM: the tokenizer lacks the special token(s) {', '.join(missing)}")
        self.next_sentence = bool(getattr(config.model, "next_sentence", False))
        specials = 3 if self.next_sentence else 2
        if config.model.block_size < specials + 1 + self.next_sentence:
            raise ValueError(f"masked LM: block_size {config.model.block_size} leaves no room for "
                             + ("two sentences between [CLS], [SEP] and [SEP] (at least 5)" if self.next_sentence
                                else "a token between [CLS] and [SEP] (at least 3)"))
        self.config, self.vocab_size, self.content = config, vocab_size, config.model.block_size - specials
        self.mask_id, self.cls_id, self.sep_id = (special_ids[r] for r in ("mask_token", "cls_token", "sep_token"))
        # Random replacements are ordinary tokens, never a special one.
        self.ordinary = np.setdiff1d(np.arange(vocab_size), list(special_ids.values()))

    def batch(self, dataset, split: str, index: int):
        """-> inputs int64 (batch_size, block_size) (with next-sentence pairs (batch_size, 2,
        block_size): ids and token types), targets int64 (batch_size, block_size)."""
        c = self.config
        window, _ = dataset.get_batch(split, index, c.batch_size, self.content, c.seed, c.sampler)
        rng = np.random.default_rng([c.seed, index, SPLITS.index(split), 7])
        if not self.next_sentence:
            return mask_tokens(window, self.cls_id, self.sep_id, self.mask_id, self.ordinary, rng)
        return sentence_pairs(window, dataset.splits[split], self.cls_id, self.sep_id, self.mask_id, self.ordinary, rng)


def mask_tokens(window, cls_id: int, sep_id: int, mask_id: int, ordinary, rng):
    """window int (B, L) -> inputs (B, L + 2) `[CLS] window [SEP]` with chosen_per_row(L) positions
    of each row chosen and replaced (80/10/10), targets (B, L + 2) the original tokens there and
    IGNORE_INDEX elsewhere."""
    B, L = window.shape
    inputs = np.empty((B, L + 2), dtype=np.int64)
    inputs[:, 0], inputs[:, 1:-1], inputs[:, -1] = cls_id, window, sep_id
    candidates = np.broadcast_to(np.arange(1, L + 1), (B, L))  # never [CLS] or [SEP]
    return _choose_and_replace(inputs, candidates, mask_id, ordinary, rng)


def sentence_pairs(window, tokens, cls_id: int, sep_id: int, mask_id: int, ordinary, rng):
    """window int (B, L) -> (inputs (B, 2, L + 3): `[CLS] A [SEP] B [SEP]` ids and token types,
    targets (B, L + 3)): A is window[:cut], B window[cut:] or, in half of the rows (label 1 at
    targets[:, 0]), the same stretch of a window at a random place of `tokens`; chosen_per_row(L)
    of the A and B tokens are chosen and replaced as in `mask_tokens`."""
    B, L = window.shape
    cut = rng.integers(1, L, size=(B, 1))  # A's length; B has L - cut >= 1 tokens
    is_random = rng.random(B) < 0.5
    starts = rng.integers(0, len(tokens) - L + 1, size=B)
    elsewhere = np.asarray(tokens[starts[:, None] + np.arange(L)], dtype=np.int64)
    j = np.arange(L)[None, :]
    content = np.where(is_random[:, None] & (j >= cut), elsewhere, window)
    where = np.where(j < cut, j + 1, j + 2)  # each content token's position: past [CLS], and [SEP] after A
    inputs = np.full((B, L + 3), sep_id, dtype=np.int64)
    inputs[:, 0] = cls_id
    rows = np.arange(B)[:, None]
    inputs[rows, where] = content
    types = (np.arange(L + 3)[None, :] > cut + 1).astype(np.int64)  # B and its [SEP] are type 1
    inputs, targets = _choose_and_replace(inputs, where, mask_id, ordinary, rng)
    targets[:, 0] = is_random
    return np.stack([inputs, types], axis=1), targets


def _choose_and_replace(inputs, candidates, mask_id: int, ordinary, rng):
    """Chooses chosen_per_row(L) of each row's L `candidates` positions and replaces them in
    `inputs` (80/10/10) -> (inputs, targets: the original tokens there, IGNORE_INDEX elsewhere)."""
    B, L = candidates.shape
    k = chosen_per_row(L)
    rows = np.arange(B)[:, None]
    chosen = candidates[rows, np.argsort(rng.random((B, L)), axis=1, kind="stable")[:, :k]]
    targets = np.full(inputs.shape, IGNORE_INDEX, dtype=np.int64)
    targets[rows, chosen] = inputs[rows, chosen]
    action = rng.random((B, k))
    replacement = np.where(action < REPLACE_WITH_MASK, mask_id,
                           np.asarray(ordinary)[rng.integers(0, len(ordinary), (B, k))])
    replace = action < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM
    inputs[rows, chosen] = np.where(replace, replacement, inputs[rows, chosen])
    return inputs, targets

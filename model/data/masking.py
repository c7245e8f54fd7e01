"""Masked-LM batches (BERT's objective): rows `[CLS] tokens [SEP]`, 15 % of the tokens chosen, each
chosen one replaced by the mask token (80 %), a random token (10 %) or kept (10 %), and predicted.

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

    config: the TrainConfig (batch_size, model.block_size, seed, sampler); vocab_size: the
    tokenizer's; special_ids: {role: id} holding at least SPECIAL_TOKENS' roles."""

    def __init__(self, config, vocab_size: int, special_ids: dict):
        missing = sorted(set(SPECIAL_TOKENS) - set(special_ids))
        if missing:
            raise ValueError(f"masked LM: the tokenizer lacks the special token(s) {', '.join(missing)}")
        if config.model.block_size < 3:
            raise ValueError(f"masked LM: block_size {config.model.block_size} leaves no room for a token "
                             "between [CLS] and [SEP] (at least 3)")
        self.config, self.vocab_size = config, vocab_size
        self.mask_id, self.cls_id, self.sep_id = (special_ids[r] for r in ("mask_token", "cls_token", "sep_token"))
        # Random replacements are ordinary tokens, never a special one.
        self.ordinary = np.setdiff1d(np.arange(vocab_size), list(special_ids.values()))

    def batch(self, dataset, split: str, index: int):
        """-> inputs, targets int64 (batch_size, block_size) of the global batch `index`."""
        c = self.config
        window, _ = dataset.get_batch(split, index, c.batch_size, c.model.block_size - 2, c.seed, c.sampler)
        return mask_tokens(window, self.cls_id, self.sep_id, self.mask_id, self.ordinary,
                           np.random.default_rng([c.seed, index, SPLITS.index(split), 7]))


def mask_tokens(window, cls_id: int, sep_id: int, mask_id: int, ordinary, rng):
    """window int (B, L) -> inputs (B, L + 2) `[CLS] window [SEP]` with chosen_per_row(L) positions
    of each row chosen and replaced (80/10/10), targets (B, L + 2) the original tokens there and
    IGNORE_INDEX elsewhere."""
    B, L = window.shape
    inputs = np.empty((B, L + 2), dtype=np.int64)
    inputs[:, 0], inputs[:, 1:-1], inputs[:, -1] = cls_id, window, sep_id
    k = chosen_per_row(L)
    chosen = np.argsort(rng.random((B, L)), axis=1, kind="stable")[:, :k] + 1  # never [CLS] or [SEP]
    rows = np.arange(B)[:, None]
    targets = np.full((B, L + 2), IGNORE_INDEX, dtype=np.int64)
    targets[rows, chosen] = inputs[rows, chosen]
    action = rng.random((B, k))
    replacement = np.where(action < REPLACE_WITH_MASK, mask_id,
                           np.asarray(ordinary)[rng.integers(0, len(ordinary), (B, k))])
    replace = action < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM
    inputs[rows, chosen] = np.where(replace, replacement, inputs[rows, chosen])
    return inputs, targets

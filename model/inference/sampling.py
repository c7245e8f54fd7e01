"""Choosing the next token from logits, the same way in one process and across workers.

With temperature > 0, each decoding step draws one uniform number per prompt, in prompt order, from
one generator seeded with the user's seed (`StepUniforms`), and a prompt's token is where its number
falls in the cumulative distribution (`sample`). Because the numbers depend only on (seed, step,
prompt index), splitting the prompts into micro-batches or over data-parallel replicas picks the
same tokens as generating them all as one batch in one process.
"""
from __future__ import annotations

import numpy as np


def sample(logits, temperature: float, top_k: int | None, uniforms=None):
    """logits float64 (B, V) on the host -> token ids int64 (B,).

    temperature 0 picks the most likely token (`uniforms` unused); otherwise `uniforms` (B, 1) in
    [0, 1) choose from the softmax of logits / temperature, limited to the top_k most likely."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    u = uniforms * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(-1), logits.shape[-1] - 1).astype(np.int64)


def sample_batch(logits, temperature: float, top_k: int | None, rng):
    """`sample` for one batch, drawing its (B, 1) uniforms from `rng` (none when temperature is 0)."""
    return sample(logits, temperature, top_k, None if temperature == 0 else rng.random((logits.shape[0], 1)))


class StepUniforms:
    """The uniform numbers of every decoding step for `prompts` prompts: step s's are the s-th draw
    of `prompts` numbers from `numpy.random.default_rng(seed)`, drawn when first asked for (steps
    are asked for in increasing order, the order one process draws them in)."""

    def __init__(self, seed, prompts: int):
        self.rng, self.prompts, self.steps = np.random.default_rng(seed), prompts, []

    def rows(self, step: int, rows) -> np.ndarray:
        """(len(rows), 1) numbers of step `step` for the prompts at indices `rows`."""
        while len(self.steps) <= step:
            self.steps.append(self.rng.random((self.prompts, 1)))
        return self.steps[step][np.asarray(rows, dtype=np.int64)]


def prompt_microbatches(lengths: list[int], count: int) -> list[list[int]]:
    """Positions of the prompts with `lengths`, in up to `count` contiguous groups of nearly equal size,
    each cut further where the length changes (a micro-batch is one (B, T) array): [[0, 1], [2], ...]."""
    groups = []
    for chunk in np.array_split(np.arange(len(lengths)), max(1, min(count, len(lengths)))):
        run = []
        for position in chunk.tolist():
            if run and lengths[position] != lengths[run[-1]]:
                groups.append(run)
                run = []
            run.append(position)
        if run:
            groups.append(run)
    return groups

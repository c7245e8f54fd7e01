"""What every training loop shares about one step: the non-finite error, the overflow warnings it
silences, and the dropout seed of a micro-batch.

The single-process `Trainer` (model/training/trainer.py) and the worker-side `ParallelTrainer`
(model/training/parallel_trainer.py) both take these from here, so a step means the same in both.
"""
from __future__ import annotations

import numpy as np

# NumPy's warnings when a step overflows: the non-finite check reports that step in one line instead.
OVERFLOW_WARNINGS = r"(overflow|invalid value|divide by zero) encountered"


class NonFiniteError(ValueError):
    """Numbers that must be finite are not, at 0-based `step` (shown 1-based, as on the console)."""

    def __init__(self, step: int, message: str):
        self.step = step
        super().__init__(f"step {step + 1}: {message}")

    @classmethod
    def of_step(cls, step: int, loss: float, grad_norm: float) -> "NonFiniteError":
        return cls(step, f"loss {loss} / gradient norm {grad_norm} is not finite; stopped before "
                         "applying it (lower --lr, or pass --on-nonfinite skip to skip such steps)")


def dropout_seed(seed: int, step: int, microbatch: int) -> int:
    """The dropout seed of one micro-batch: a function of (seed, step, microbatch) only."""
    return int(np.random.default_rng([seed, step, 2, microbatch]).integers(2**31))

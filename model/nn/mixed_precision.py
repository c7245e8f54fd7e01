"""Mixed-precision training: a float16 model, float32 master weights, dynamic loss scaling.

    --dtype fp16-mixed    forward and backward in float16 (statistics in float32, see model/nn/ops.py);
                          AdamW updates float32 master weights, which are rounded into the model
    --dtype bf16-mixed    refused: neither NumPy nor the CuPy releases ringpipe supports have a
                          bfloat16 array type (`check_supported` says so in one line)

One step (the standard scheme of apex / torch.cuda.amp):
 1. the loss is multiplied by the scale S (the backward gets dloss = S / microbatches), so small
    gradients do not flush to zero in float16;
 2. the float16 gradients are added into float32 master gradients and multiplied by 1/S;
 3. if any of them is inf or nan (an overflow somewhere in the float16 backward), the step is
    skipped: weights, AdamW moments and AdamW's update count stay as they were, and S halves;
 4. otherwise the unscaled gradients are clipped by their global norm, AdamW updates the master
    weights, and the model gets them rounded to float16. After `growth_interval` good steps in a
    row, S doubles.

The training step counter counts batches consumed, skipped ones included: the batch, the dropout
masks and the learning rate of step s stay functions of s, and a resumed run repeats an
uninterrupted one. AdamW's own count (its bias correction) counts applied updates only.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from ringpipe.model.nn.optim import AdamW

MIXED_DTYPES = {"fp16-mixed": "float16", "bf16-mixed": "bfloat16"}
DTYPES = ("float32", "float64", *MIXED_DTYPES)  # every --dtype a command offers (train, plan)
MASTER_DTYPE = "float32"
INITIAL_LOSS_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 2000


def is_mixed(dtype: str) -> bool:
    return dtype in MIXED_DTYPES


def model_dtype(dtype: str) -> str:
    """The dtype the model computes in: float16 for "fp16-mixed", `dtype` itself otherwise."""
    return MIXED_DTYPES.get(dtype, dtype)


def weights_dtype(dtype: str) -> str:
    """The dtype of the weights a run keeps and checkpoints (float32 master weights when mixed)."""
    return MASTER_DTYPE if is_mixed(dtype) else dtype


def check_supported(dtype: str) -> None:
    """ValueError (one line) for a mixed dtype the array modules cannot run."""
    if dtype == "bf16-mixed":
        raise ValueError("--dtype bf16-mixed: NumPy has no bfloat16 array type, and no CuPy bfloat16 "
                         "path is tested; use fp16-mixed")


class LossScaler:
    """Dynamic loss scale: halves on an overflowing step, doubles after `growth_interval` good ones.

    `scale` is a power of two (so scaling and unscaling are exact); it never drops below 1, since a
    scale below 1 would push small gradients towards float16's underflow instead of away from it.
    """

    def __init__(self, scale: float = INITIAL_LOSS_SCALE, growth_interval: int = GROWTH_INTERVAL):
        if growth_interval < 1:
            raise ValueError(f"loss scale growth interval must be at least 1, got {growth_interval}")
        self.scale = float(scale)
        self.growth_interval = int(growth_interval)
        self.good_steps = 0  # consecutive steps without overflow since the last change of scale
        self.skipped = 0  # steps skipped in this run so far (for metrics)

    def update(self, found_overflow: bool) -> bool:
        """Record one step's outcome; returns whether its update is to be applied."""
        if found_overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"loss_scale": np.array(self.scale, dtype=np.float64),
                "loss_scale_good_steps": np.array(self.good_steps, dtype=np.int64)}

    def load_state_dict(self, state: dict) -> None:
        """ValueError when `state` lacks the scaler's entries (a checkpoint of a non-mixed run)."""
        for key in ("loss_scale", "loss_scale_good_steps"):
            if key not in state:
                raise ValueError(f"optimizer state lacks {key!r}: not a mixed-precision checkpoint")
        scale = float(state["loss_scale"])
        if not (math.isfinite(scale) and scale >= 1.0):
            raise ValueError(f"optimizer state has loss_scale {scale}, expected a finite value >= 1")
        self.scale, self.good_steps = scale, int(state["loss_scale_good_steps"])


class LossScaledAdamW(AdamW):
    """AdamW over float32 master weights, with the run's `LossScaler` as `scaler`: its state goes
    into `state_dict()` ("loss_scale", "loss_scale_good_steps" beside AdamW's entries) and comes
    back from `load_state_dict`, so checkpoints of a mixed run carry it."""

    def __init__(self, params: dict, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 scaler: LossScaler | None = None):
        super().__init__(params, betas, eps, weight_decay)
        self.scaler = scaler or LossScaler()

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scaler.load_state_dict(state)


def overflow_expected(dtype):
    """A context in which float16 overflow is silent (NumPy would warn at each): overflowing is
    how a too-large loss scale shows, and the scaler deals with it. A no-op for other dtypes."""
    if np.dtype(dtype) == np.float16:
        return np.errstate(over="ignore", invalid="ignore")
    return contextlib.nullcontext()


def has_overflow(xp, flat_grads) -> bool:
    """Whether a (flat) gradient array holds an inf or a nan."""
    return not bool(xp.isfinite(flat_grads).all())

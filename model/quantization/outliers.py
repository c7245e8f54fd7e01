"""LLM.int8()'s outlier features, found on calibration text: the input features of a linear layer
where some activation reaches the threshold (6.0 in the paper). Their weight rows stay in float
(model/quantization/int8.py), as LLM.int8() multiplies those features in 16-bit.

Weight-only int8 errs by x · ΔW, so a feature that carries large activations multiplies its rows'
rounding errors by them; keeping those few rows in float removes the largest error terms.
"""
from __future__ import annotations

import numpy as np

LLM_INT8_THRESHOLD = 6.0  # LLM.int8()'s default outlier threshold


class _InputRecorder:
    """Stands in for a linear weight (in, out): `x @ recorder` is x @ weight, and it keeps the
    largest |x| seen per input feature."""

    __array_ufunc__ = None  # ndarray @ recorder -> recorder.__rmatmul__

    def __init__(self, weight):
        self.weight = weight
        self.absmax = np.zeros(weight.shape[0])

    @property
    def shape(self):
        return self.weight.shape

    def __rmatmul__(self, x):
        np.maximum(self.absmax, np.abs(x).max(axis=0), out=self.absmax)
        return x @ self.weight


def outlier_features(model, batches, names, threshold: float = LLM_INT8_THRESHOLD) -> dict:
    """{name: int64 rows}: for each linear weight `names` of `model` (a dense float model whose
    linear layers compute x @ params[name]), the input features where any activation of the
    calibration `batches` (token ids (B, T) each) has magnitude >= threshold."""
    if not threshold > 0:
        raise ValueError(f"outlier threshold must be positive, got {threshold}")
    originals = {name: model.params[name] for name in names}
    recorders = {name: _InputRecorder(weight) for name, weight in originals.items()}
    try:
        model.params.update(recorders)
        for inputs in batches:
            model.forward(inputs)
    finally:
        model.params.update(originals)
    return {name: np.flatnonzero(recorder.absmax >= threshold) for name, recorder in recorders.items()}

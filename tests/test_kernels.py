"""The C kernels (model/nn/kernels.py) agree with the NumPy reference ops, build once per machine,
and fall back to NumPy with a reason when they cannot be built."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ringpipe.model.nn import causal_attention, kernels, ops
from ringpipe.model.nn.optim import adamw_update

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(kernels.library() is None, reason=kernels.status())

TOLERANCE = {np.float32: 2e-6, np.float64: 1e-13}  # relative to the output's largest magnitude


def both_paths(fn):
    """fn() with the C kernels, then with NumPy: (c_result, numpy_result)."""
    results = []
    for on in (True, False):
        previous = kernels.use_kernels(on)
        try:
            results.append(fn())
        finally:
            kernels.use_kernels(previous)
    return results


def assert_close(c, reference, dtype):
    """Tuples of arrays, element by element."""
    assert len(c) == len(reference)
    for a, b in zip(c, reference):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(float(np.max(np.abs(b))), 1e-30)
        assert float(np.max(np.abs(a - b))) / scale <= TOLERANCE[dtype]


DTYPES = [np.float32, np.float64]


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_forward_and_backward(dtype):
    rng = np.random.default_rng(0)
    x, dout = rand(rng, (3, 17, 40), dtype, 3.0), rand(rng, (3, 17, 40), dtype)
    w, b = rand(rng, 40, dtype), rand(rng, 40, dtype)

    def run():
        out, cache = ops.layernorm_forward(x, w, b)
        return (out, *cache, *ops.layernorm_backward(dout, cache, w))

    assert_close(*both_paths(run), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_forward_and_backward_including_large_inputs(dtype):
    rng = np.random.default_rng(1)
    x = rand(rng, (5, 333), dtype, 4.0)
    x[0, :6] = [-200, -30, -9, 9, 30, 200]  # e^{-2|z|} underflows: sigmoid must be exactly 0 or 1
    dout = rand(rng, x.shape, dtype)

    def run():
        out, cache = ops.gelu_forward(x)
        return (out, cache[1], ops.gelu_backward(dout, cache))

    c, reference = both_paths(run)
    assert_close(c, reference, dtype)
    assert np.all(np.isfinite(c[0])) and np.all(np.isfinite(c[2]))
    np.testing.assert_allclose(c[0][0, :6], reference[0][0, :6], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 64, 200])  # NumPy: 200 is three query blocks
@pytest.mark.parametrize("H, hs", [(3, 8), (2, 32), (1, 64), (2, 40), (2, 6)])  # 32, 64: own
def test_causal_attention_forward_and_backward(dtype, T, H, hs):              # builds; 6: NumPy
    rng = np.random.default_rng(2)
    qkv, dy = rand(rng, (2, T, 3 * H * hs), dtype, 2.0), rand(rng, (2, T, H * hs), dtype)

    def run():
        y, cache = causal_attention.attention_forward(qkv, H)
        # the probabilities as one (B, H, T, T) array, however many query blocks made them
        probs = np.zeros((2, H, T, T), dtype)
        for (start, end), block in zip(cache[1], cache[2]):
            probs[:, :, start:end, :end] = block if block.ndim == 4 else kernels.unpack_causal(block, T)
        return (y, probs, causal_attention.attention_backward(dy, cache, H))

    assert_close(*both_paths(run), dtype)


def test_packed_attention_probabilities_take_half_the_memory_and_unpack_for_numpy():
    rng = np.random.default_rng(6)
    T = 40
    qkv, dy = rand(rng, (2, T, 3 * 64), np.float64), rand(rng, (2, T, 64), np.float64)
    y, cache = causal_attention.attention_forward(qkv, 2)
    packed = cache[2][0]
    assert packed.shape == (2, 2, int(kernels.causal_rows(T)[-1])) and packed.size < 0.62 * 2 * 2 * T * T
    expected = causal_attention.attention_backward(dy, cache, 2)
    previous = kernels.use_kernels(False)  # a backward on the NumPy path unpacks the forward's cache
    try:
        np.testing.assert_allclose(causal_attention.attention_backward(dy, cache, 2), expected, rtol=1e-12, atol=1e-14)
    finally:
        kernels.use_kernels(previous)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_with_ignored_targets(dtype):
    rng = np.random.default_rng(3)
    logits = rand(rng, (4, 9, 31), dtype, 5.0)
    targets = rng.integers(0, 31, (4, 9))
    targets[1, :4] = -1

    def run():
        loss, cache = ops.cross_entropy_forward(logits, targets, ignore_index=-1)
        return (np.array(loss, dtype), ops.cross_entropy_backward(cache))

    assert_close(*both_paths(run), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_as_on_the_numpy_path(dtype):
    """A diverged step must show up as NaN, not be squashed by the kernels' clamps."""
    x = np.ones((1, 8, 3 * 64), dtype)  # 2 heads of 32
    x[0, 5, 64 + 32 + 8] = np.nan  # the key at position 5 of head 1
    y, _ = causal_attention.attention_forward(x, 2)
    assert np.isnan(y[0, 5:, 32:]).all()
    assert not np.isnan(y[0, :5]).any() and not np.isnan(y[0, :, :32]).any()
    g, _ = ops.gelu_forward(np.array([0.5, np.nan, -3.0], dtype))
    assert np.isnan(g[1]) and not np.isnan(g[[0, 2]]).any()
    logits = np.zeros((1, 2, 5), dtype)
    logits[0, 1, 3] = np.nan
    loss, _ = ops.cross_entropy_forward(logits, np.array([[1, 2]]))
    assert np.isnan(loss)


@pytest.mark.parametrize("kernels_on", [True, False])
@pytest.mark.parametrize("bad", [5, -2])
def test_cross_entropy_rejects_a_target_outside_the_vocabulary(kernels_on, bad):
    logits = np.zeros((1, 3, 5), np.float32)
    previous = kernels.use_kernels(kernels_on)
    try:
        with pytest.raises(IndexError, match=f"target {bad} at position 1 is outside the vocabulary of 5"):
            ops.cross_entropy_forward(logits, np.array([[0, bad, 1]]))
    finally:
        kernels.use_kernels(previous)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1, "per element"])  # the last: ZeRO-1 shards
def test_adamw_update(dtype, weight_decay):
    def run():
        rng = np.random.default_rng(4)
        p, m, v = rand(rng, 1001, dtype), np.zeros(1001, dtype), np.zeros(1001, dtype)
        decay = weight_decay
        if decay == "per element":
            decay = np.where(np.arange(1001) < 600, 0.1, 0.0).astype(dtype)
        for step in range(1, 6):
            adamw_update(p, rand(rng, 1001, dtype), m, v, step, 1e-2, 0.9, 0.99, 1e-8, decay)
        return p, m, v

    c, reference = both_paths(run)
    for a, b in zip(c, reference):
        np.testing.assert_allclose(a, b, rtol=TOLERANCE[dtype] * 10, atol=TOLERANCE[dtype])


def test_non_contiguous_or_mixed_inputs_take_the_numpy_path():
    x = np.ones((4, 6), np.float32)
    assert kernels.usable(x)
    assert not kernels.usable(x.T)
    assert not kernels.usable(x, np.ones(6, np.float64))
    assert not kernels.usable(x.astype(np.float16))
    y = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32).T
    strided, _ = ops.gelu_forward(y)  # NumPy
    contiguous, _ = ops.gelu_forward(np.ascontiguousarray(y))  # C
    np.testing.assert_allclose(strided, contiguous, rtol=2e-6, atol=1e-7)


def _status_in_fresh_process(tmp_path, **env):
    environment = {**os.environ, "RINGPIPE_CACHE": str(tmp_path), **env}
    result = subprocess.run(
        [sys.executable, "-c", "from ringpipe.model.nn import kernels; print(kernels.status())"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.timeout(120)
def test_built_once_into_the_cache_and_loaded_from_there(train_run_from_an_empty_kernel_cache):
    _, cache = train_run_from_an_empty_kernel_cache  # a driver and 2 workers started with it empty
    built = list(cache.glob("kernels-*.so"))
    assert len(built) == 1 and not list(cache.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    assert _status_in_fresh_process(cache) == "c"
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_without_a_compiler_the_numpy_path_stays_and_says_why(tmp_path):
    status = _status_in_fresh_process(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert status.startswith("numpy (C kernels unavailable")
    assert not list(tmp_path.glob("kernels-*"))  # nothing half-written


def test_turned_off_by_environment(tmp_path):
    assert _status_in_fresh_process(tmp_path, RINGPIPE_KERNELS="numpy") == "numpy (turned off)"

"""Every op's backward agrees with central finite differences of its forward (float64).

Each test runs twice: through the C kernels (model/nn/kernels.py, where they build on this machine)
and through the NumPy reference code.
"""
import numpy as np
import pytest

from ringpipe.model.nn import causal_attention, ops


# Every op's check runs through the C kernels and through NumPy (conftest's kernel_path).
pytestmark = pytest.mark.usefixtures("kernel_path")

RNG = np.random.default_rng(1234)


def numerical_grad(f, x, eps=1e-6):
    """d f() / d x by central differences; f reads x, which is perturbed in place."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for j in range(flat.size):
        old = flat[j]
        flat[j] = old + eps
        plus = f()
        flat[j] = old - eps
        minus = f()
        flat[j] = old
        gflat[j] = (plus - minus) / (2 * eps)
    return grad


def directional_derivative(f, x, direction, eps=1e-6):
    """d f(x + s·direction) / ds at s = 0 by central differences; f reads x, perturbed in place."""
    saved = x.copy()
    x[...] = saved + eps * direction
    plus = f()
    x[...] = saved - eps * direction
    minus = f()
    x[...] = saved
    return (plus - minus) / (2 * eps)


def relative_error(analytic, numeric):
    return np.linalg.norm(analytic - numeric) / max(np.linalg.norm(numeric), 1e-30)


def assert_grad(analytic, f, x, tol=1e-6):
    numeric = numerical_grad(f, x)
    assert relative_error(analytic, numeric) <= tol


def randn(*shape):
    return RNG.standard_normal(shape)


def test_embedding_backward_matches_finite_differences():
    weight, idx = randn(7, 5), RNG.integers(0, 7, (2, 6))
    upstream = randn(2, 6, 5)
    out, cache = ops.embedding_forward(weight, idx)
    dweight = ops.embedding_backward(upstream, cache, 7)
    assert_grad(dweight, lambda: np.sum(ops.embedding_forward(weight, idx)[0] * upstream), weight)


def test_layernorm_backward_matches_finite_differences():
    x, w, b = randn(2, 3, 8), randn(8), randn(8)
    upstream = randn(2, 3, 8)
    _, cache = ops.layernorm_forward(x, w, b)
    dx, dw, db = ops.layernorm_backward(upstream, cache, w)
    loss = lambda: np.sum(ops.layernorm_forward(x, w, b)[0] * upstream)  # noqa: E731
    assert_grad(dx, loss, x)
    assert_grad(dw, loss, w)
    assert_grad(db, loss, b)


def test_layernorm_output_is_normalized_with_eps_1e5():
    x = randn(4, 16)
    out, _ = ops.layernorm_forward(x, np.ones(16), np.zeros(16))
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_linear_split_backward_matches_finite_differences():
    x, W, b = randn(2, 3, 5), randn(5, 4), randn(4)
    upstream = randn(2, 3, 4)
    out, cache = ops.linear_forward(x, W, b)
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-12)
    dx = ops.linear_backward_input(upstream, W)
    dW, db = ops.linear_backward_weight(upstream, cache)
    loss = lambda: np.sum(ops.linear_forward(x, W, b)[0] * upstream)  # noqa: E731
    assert_grad(dx, loss, x)
    assert_grad(dW, loss, W)
    assert_grad(db, loss, b)


@pytest.mark.parametrize("T, dropout_p", [(5, 0.0), (5, 0.3), (130, 0.0), (130, 0.3)])
def test_attention_backward_matches_finite_differences(T, dropout_p):
    B, C, H = 1, 4, 2  # T=130: two query blocks
    qkv, upstream = randn(B, T, 3 * C), randn(B, T, C)

    def forward():
        rng = np.random.default_rng(7)  # the same dropout mask on every call
        return causal_attention.attention_forward(qkv, H, dropout_p, rng)

    _, cache = forward()
    dqkv = causal_attention.attention_backward(upstream, cache, H)
    loss = lambda: np.sum(forward()[0] * upstream)  # noqa: E731
    if T < 64:
        assert_grad(dqkv, loss, qkv)
        return
    # T=130: each entry of the rows at both ends of both query blocks ([0, 65), [65, 130)), then the
    # whole gradient along a random direction (all 1,560 entries one at a time took ~20 s).
    rows = [0, 1, 63, 64, 65, 66, 128, 129]
    numeric = np.zeros((B, len(rows), 3 * C))
    for b, i, j in np.ndindex(numeric.shape):
        unit = np.zeros_like(qkv)
        unit[b, rows[i], j] = 1.0
        numeric[b, i, j] = directional_derivative(loss, qkv, unit)
    assert relative_error(dqkv[:, rows], numeric) <= 1e-6
    direction = np.random.default_rng(130).standard_normal(qkv.shape)
    along = np.sum(dqkv * direction)
    assert abs(directional_derivative(loss, qkv, direction) - along) <= 1e-6 * abs(along)


@pytest.mark.parametrize("T", [6, 200, 256])  # one, three and four query blocks
def test_attention_is_causal_and_matches_reference(T):
    B, C, H = 2, 8, 2
    qkv = randn(B, T, 3 * C)
    y, _ = causal_attention.attention_forward(qkv, H)
    q, k, v = (a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H)
    scores[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_softmax_backward_matches_finite_differences():
    x, upstream = randn(3, 7), randn(3, 7)
    probs = causal_attention.softmax_forward(x.copy())
    dx = causal_attention.softmax_backward(upstream.copy(), probs)
    assert_grad(dx, lambda: np.sum(causal_attention.softmax_forward(x.copy()) * upstream), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_of_a_row_far_below_the_others_is_exact(dtype):
    # softmax_forward shifts the whole array by one max; this row would underflow under it.
    x = np.array([[0.0, 1.0, 2.0], [-500.0, -499.0, -498.0]], dtype=dtype)
    probs = causal_attention.softmax_forward(x.copy())
    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(probs, [expected, expected], rtol=1e-6)
    assert probs.dtype == dtype


def test_gelu_backward_matches_finite_differences():
    x, upstream = randn(4, 6) * 3, randn(4, 6)
    _, cache = ops.gelu_forward(x)
    dx = ops.gelu_backward(upstream, cache)
    assert_grad(dx, lambda: np.sum(ops.gelu_forward(x)[0] * upstream), x)


def test_gelu_is_the_tanh_approximation_even_for_large_inputs():
    x = np.concatenate([randn(50) * 3, [-1000.0, -60.0, 60.0, 1000.0]])
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out, _ = ops.gelu_forward(x)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_residual_backward_matches_finite_differences():
    x, y, upstream = randn(2, 3), randn(2, 3), randn(2, 3)
    dx, dy = ops.residual_backward(upstream)
    loss = lambda: np.sum(ops.residual_forward(x, y) * upstream)  # noqa: E731
    assert_grad(dx, loss, x)
    assert_grad(dy, loss, y)


def test_dropout_backward_matches_finite_differences():
    x, upstream = randn(5, 8), randn(5, 8)
    forward = lambda: ops.dropout_forward(x, 0.4, np.random.default_rng(3))  # noqa: E731
    out, keep_mask = forward()
    assert 0 < np.count_nonzero(out == 0) < out.size
    dx = ops.dropout_backward(upstream, keep_mask)
    assert_grad(dx, lambda: np.sum(forward()[0] * upstream), x)


def test_dropout_keeps_the_expected_value():
    out, _ = ops.dropout_forward(np.ones(200_000), 0.25, np.random.default_rng(0))
    assert abs(out.mean() - 1.0) < 0.01


def test_cross_entropy_backward_matches_finite_differences_with_ignore_index():
    logits = randn(2, 4, 6)
    targets = RNG.integers(0, 6, (2, 4))
    targets[0, 1] = targets[1, 3] = -1
    loss, cache = ops.cross_entropy_forward(logits, targets, ignore_index=-1)
    dlogits = ops.cross_entropy_backward(cache)
    assert np.all(dlogits[0, 1] == 0) and np.all(dlogits[1, 3] == 0)
    assert_grad(dlogits, lambda: ops.cross_entropy_forward(logits, targets, -1)[0], logits)


def test_cross_entropy_is_mean_negative_log_likelihood_over_kept_targets():
    logits, targets = randn(3, 5), np.array([4, -100, 0])
    loss, _ = ops.cross_entropy_forward(logits[None], targets[None], ignore_index=-100)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert loss == pytest.approx(-(logp[0, 4] + logp[2, 0]) / 2, rel=1e-12)


def test_cross_entropy_stays_finite_when_the_target_probability_underflows():
    logits = np.array([[[0.0, 200.0]]], dtype=np.float32)
    loss, _ = ops.cross_entropy_forward(logits, np.array([[0]]))
    assert loss == pytest.approx(200.0)

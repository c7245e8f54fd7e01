"""BERT's and T5's non-attention ops (model/nn/encoder_decoder_ops.py): every backward agrees with
central finite differences of its forward in float64, and the forwards mean what they say."""
import math

import numpy as np
import pytest

from ringpipe.model.nn import encoder_decoder_ops as edo
from tests.test_model_ops import assert_grad, randn

RNG = np.random.default_rng(99)


def test_rms_norm_backward_matches_finite_differences():
    x, w, upstream = randn(2, 3, 8), randn(8), randn(2, 3, 8)
    _, cache = edo.rms_norm_forward(x, w)
    dx, dw = edo.rms_norm_backward(upstream, cache, w)
    loss = lambda: np.sum(edo.rms_norm_forward(x, w)[0] * upstream)  # noqa: E731
    assert_grad(dx, loss, x)
    assert_grad(dw, loss, w)


def test_rms_norm_neither_subtracts_the_mean_nor_adds_a_bias():
    x = randn(4, 16) + 3.0
    out, _ = edo.rms_norm_forward(x, np.full(16, 2.0), eps=1e-6)
    expected = 2.0 * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-13)


def test_relu_backward_matches_finite_differences():
    x, upstream = randn(3, 7), randn(3, 7)
    _, cache = edo.relu_forward(x)
    assert_grad(edo.relu_backward(upstream, cache),
                lambda: np.sum(edo.relu_forward(x)[0] * upstream), x)


def test_gated_gelu_backward_matches_finite_differences():
    gate, up, upstream = randn(2, 3, 6), randn(2, 3, 6), randn(2, 3, 6)
    _, cache = edo.gated_gelu_forward(gate, up)
    dgate, dup = edo.gated_gelu_backward(upstream, cache)
    loss = lambda: np.sum(edo.gated_gelu_forward(gate, up)[0] * upstream)  # noqa: E731
    assert_grad(dgate, loss, gate)
    assert_grad(dup, loss, up)


def test_gelu_erf_backward_matches_finite_differences():
    x, upstream = randn(4, 5) * 3, randn(4, 5)
    _, cache = edo.gelu_erf_forward(x)
    assert_grad(edo.gelu_erf_backward(upstream, cache),
                lambda: np.sum(edo.gelu_erf_forward(x)[0] * upstream), x)


def test_gelu_erf_is_x_times_the_normal_cdf():
    x = np.linspace(-6, 6, 25)
    expected = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(edo.gelu_erf_forward(x)[0], expected, rtol=1e-15, atol=1e-300)


def test_bert_embeddings_backward_matches_finite_differences(kernel_path):
    B, T, C, V, P, NT = 2, 4, 6, 7, 5, 2
    word, position, types = randn(V, C), randn(P, C), randn(NT, C)
    ln_w, ln_b, upstream = randn(C), randn(C), randn(B, T, C)
    ids, type_ids = RNG.integers(0, V, (B, T)), RNG.integers(0, NT, (B, T))

    def forward():
        return edo.bert_embeddings_forward(ids, type_ids, word, position, types, ln_w, ln_b)

    _, cache = forward()
    grads = edo.bert_embeddings_backward(upstream, cache, ln_w, V, P, NT)
    loss = lambda: np.sum(forward()[0] * upstream)  # noqa: E731
    for grad, x in zip(grads, [word, position, types, ln_w, ln_b]):
        assert_grad(grad, loss, x)


def test_bert_embeddings_without_token_types_use_type_zero():
    C = 4
    word, position, types = randn(5, C), randn(6, C), randn(2, C)
    ids = RNG.integers(0, 5, (2, 3))
    ones, zeros = np.ones(C), np.zeros(C)
    implicit, _ = edo.bert_embeddings_forward(ids, None, word, position, types, ones, zeros)
    explicit, _ = edo.bert_embeddings_forward(ids, np.zeros_like(ids), word, position, types,
                                              ones, zeros)
    np.testing.assert_array_equal(implicit, explicit)


def test_bert_embeddings_refuse_a_sequence_longer_than_the_position_table():
    with pytest.raises(ValueError, match="7 tokens is longer than the position table .5 pos"):
        edo.bert_embeddings_forward(np.zeros((1, 7), np.int64), None, randn(3, 4), randn(5, 4),
                                    randn(2, 4), np.ones(4), np.zeros(4))


def test_mlm_transform_backward_matches_finite_differences(kernel_path):
    B, T, C = 2, 3, 4
    x, w, b, ln_w, ln_b, upstream = (randn(B, T, C), randn(C, C), randn(C), randn(C), randn(C),
                                     randn(B, T, C))
    _, cache = edo.mlm_transform_forward(x, w, b, ln_w, ln_b)
    grads = edo.mlm_transform_backward(upstream, cache, w, ln_w)
    loss = lambda: np.sum(edo.mlm_transform_forward(x, w, b, ln_w, ln_b)[0] * upstream)  # noqa
    for grad, param in zip(grads, [x, w, b, ln_w, ln_b]):
        assert_grad(grad, loss, param)


def test_tied_decoder_and_masked_loss_backward_match_finite_differences(kernel_path):
    B, T, C, V = 2, 4, 3, 6
    h, word, bias = randn(B, T, C), randn(V, C), randn(V)
    labels = np.full((B, T), edo.MLM_IGNORE_INDEX)
    labels[0, 1], labels[1, 3], labels[1, 0] = 2, 5, 0

    def loss():
        logits, _ = edo.tied_decoder_forward(h, word, bias)
        return edo.masked_lm_loss_forward(logits, labels)[0]

    logits, h_cache = edo.tied_decoder_forward(h, word, bias)
    _, loss_cache = edo.masked_lm_loss_forward(logits, labels)
    dlogits = edo.masked_lm_loss_backward(loss_cache)
    dh, dword, dbias = edo.tied_decoder_backward(dlogits, h_cache, word)
    for grad, x in [(dh, h), (dword, word), (dbias, bias)]:
        assert_grad(grad, loss, x)


def test_masked_loss_is_the_mean_over_chosen_positions_only():
    logits = randn(1, 4, 5)
    labels = np.array([[edo.MLM_IGNORE_INDEX, 3, edo.MLM_IGNORE_INDEX, 1]])
    loss, cache = edo.masked_lm_loss_forward(logits, labels)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert loss == pytest.approx(-(log_probs[0, 1, 3] + log_probs[0, 3, 1]) / 2, rel=1e-13)
    dlogits = edo.masked_lm_loss_backward(cache)
    assert not dlogits[0, 0].any() and not dlogits[0, 2].any()


def test_float16_rms_norm_computes_in_float32_and_rounds_once():
    x, w, upstream = (randn(3, 16) * 30).astype(np.float16), randn(16).astype(np.float16), randn(3, 16)
    reference, _ = edo.rms_norm_forward(x.astype(np.float32), w.astype(np.float32))
    half, cache16 = edo.rms_norm_forward(x, w)
    assert half.dtype == np.float16 and cache16[0].dtype == np.float32
    np.testing.assert_array_equal(half, reference.astype(np.float16))
    dx, dw = edo.rms_norm_backward(upstream.astype(np.float16), cache16, w)
    assert dx.dtype == dw.dtype == np.float16

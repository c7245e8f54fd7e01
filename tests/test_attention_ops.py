"""The encoder / encoder-decoder attentions (model/nn/attention_ops.py): every backward agrees with
central finite differences of its forward in float64, and the forwards mean what they say."""
import numpy as np
import pytest

from ringpipe.model.nn import attention_ops as ao
from tests.test_model_ops import assert_grad, randn

RNG = np.random.default_rng(4321)


def padding_mask(B, T, lengths):
    return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


@pytest.mark.parametrize("causal, dropout_p", [(False, 0.0), (False, 0.3), (True, 0.0)])
def test_self_attention_backward_matches_finite_differences(causal, dropout_p):
    B, T, C, H = 2, 5, 4, 2
    qkv, upstream = randn(B, T, 3 * C), randn(B, T, C)
    mask, bias = padding_mask(B, T, [5, 3]), randn(1, H, T, T)

    def forward():
        rng = np.random.default_rng(7)  # the same dropout mask on every call
        return ao.self_attention_forward(qkv, H, mask, bias, causal, dropout_p=dropout_p, rng=rng)

    _, cache = forward()
    dqkv, dbias = ao.self_attention_backward(upstream, cache, H)
    loss = lambda: np.sum(forward()[0] * upstream)  # noqa: E731
    assert_grad(dqkv, loss, qkv)
    assert_grad(dbias, loss, bias)


def test_self_attention_ignores_padded_keys():
    B, T, C, H = 1, 6, 4, 2
    qkv = randn(B, T, 3 * C)
    mask = padding_mask(B, T, [4])
    y, _ = ao.self_attention_forward(qkv, H, mask)
    changed = qkv.copy()
    changed[:, 4:, C:] = randn(B, 2, 2 * C)  # other keys and values at the padded positions
    y_changed, _ = ao.self_attention_forward(changed, H, mask)
    np.testing.assert_allclose(y, y_changed, rtol=1e-13, atol=1e-13)


def test_self_attention_without_mask_sees_every_position():
    B, T, C, H = 2, 4, 6, 3
    qkv = randn(B, T, 3 * C)
    y, _ = ao.self_attention_forward(qkv, H)
    q, k, v = (a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


def test_a_query_whose_keys_are_all_padding_stays_finite():
    qkv = randn(1, 3, 12)
    y, _ = ao.self_attention_forward(qkv, 2, np.zeros((1, 3), np.int64))
    assert np.isfinite(y).all()


def test_key_mask_of_the_wrong_shape_is_refused_by_name():
    with pytest.raises(ValueError, match="key mask of shape"):
        ao.self_attention_forward(randn(2, 3, 12), 2, np.ones((2, 4)))


@pytest.mark.parametrize("has_bias", [True, False])
def test_cross_attention_backward_matches_finite_differences(has_bias):
    B, Tq, Tk, C, H = 2, 3, 5, 4, 2
    q, encoder_out, upstream = randn(B, Tq, C), randn(B, Tk, C), randn(B, Tq, C)
    kv_weight, kv_bias = randn(C, 2 * C), (randn(2 * C) if has_bias else None)
    mask = padding_mask(B, Tk, [5, 2])

    def forward():
        return ao.cross_attention_forward(q, encoder_out, kv_weight, kv_bias, H, mask)

    _, cache = forward()
    dq, dencoder, dkv_weight, dkv_bias, dposition = ao.cross_attention_backward(
        upstream, cache, kv_weight, H, has_bias)
    assert dposition is None and (dkv_bias is None) == (not has_bias)
    loss = lambda: np.sum(forward()[0] * upstream)  # noqa: E731
    for grad, x in [(dq, q), (dencoder, encoder_out), (dkv_weight, kv_weight)]:
        assert_grad(grad, loss, x)
    if has_bias:
        assert_grad(dkv_bias, loss, kv_bias)


def test_encoder_output_gradient_summed_over_two_decoder_layers_matches_finite_differences():
    # Two cross-attentions read the same encoder output, the second's queries built from the
    # first's output: the encoder output's gradient is the sum of both layers' shares.
    B, Tq, Tk, C, H = 2, 3, 4, 4, 2
    q, encoder_out, upstream = randn(B, Tq, C), randn(B, Tk, C), randn(B, Tq, C)
    w1, b1, w2, b2, wq = randn(C, 2 * C), randn(2 * C), randn(C, 2 * C), randn(2 * C), randn(C, C)
    mask = padding_mask(B, Tk, [4, 3])

    def forward():
        y1, cache1 = ao.cross_attention_forward(q, encoder_out, w1, b1, H, mask)
        y2, cache2 = ao.cross_attention_forward(y1 @ wq, encoder_out, w2, b2, H, mask)
        return y2, cache1, cache2

    _, cache1, cache2 = forward()
    dq2, dencoder2, *_ = ao.cross_attention_backward(upstream, cache2, w2, H)
    _, dencoder1, *_ = ao.cross_attention_backward(dq2 @ wq.T, cache1, w1, H)
    assert_grad(dencoder1 + dencoder2, lambda: np.sum(forward()[0] * upstream), encoder_out)


def test_cross_attention_to_one_key_returns_its_value():
    B, Tq, C, H = 1, 3, 4, 2
    encoder_out, kv_weight = randn(B, 1, C), randn(C, 2 * C)
    y, _ = ao.cross_attention_forward(randn(B, Tq, C), encoder_out, kv_weight, None, H)
    value = (encoder_out @ kv_weight)[..., C:]
    np.testing.assert_allclose(y, np.broadcast_to(value, y.shape), rtol=1e-13)


def test_relative_position_bias_backward_matches_finite_differences():
    T, H, num_buckets = 5, 2, 8
    table, upstream = randn(num_buckets, H), randn(3, H, T, T)
    buckets = ao.relative_position_buckets(T, T, True, num_buckets, max_distance=16)
    bias, cache = ao.relative_position_bias_forward(table, buckets)
    assert bias.shape == (1, H, T, T)
    dtable = ao.relative_position_bias_backward(upstream, cache, num_buckets)
    # The bias is broadcast over a batch of 3: its gradient sums the batch.
    loss = lambda: np.sum(ao.relative_position_bias_forward(table, buckets)[0] * upstream)  # noqa
    assert_grad(dtable, loss, table)


def test_relative_position_bias_through_attention_matches_finite_differences():
    B, T, C, H, num_buckets = 2, 4, 4, 2, 6
    qkv, table, upstream = randn(B, T, 3 * C), randn(num_buckets, H), randn(B, T, C)
    buckets = ao.relative_position_buckets(T, T, False, num_buckets, max_distance=8)

    def forward():
        bias, _ = ao.relative_position_bias_forward(table, buckets)
        return ao.self_attention_forward(qkv, H, position_bias=bias, causal=True, scale=1.0)

    _, cache = forward()
    _, dbias = ao.self_attention_backward(upstream, cache, H, scale=1.0)
    dtable = ao.relative_position_bias_backward(dbias, buckets, num_buckets)
    assert_grad(dtable, lambda: np.sum(forward()[0] * upstream), table)


def test_unidirectional_buckets_put_every_later_key_in_bucket_zero():
    buckets = ao.relative_position_buckets(6, 6, bidirectional=False)
    assert (buckets[np.triu_indices(6, 1)] == 0).all()
    np.testing.assert_array_equal(np.diag(buckets, -3), 3)  # key 3 before the query


def test_bidirectional_buckets_split_before_and_after():
    buckets = ao.relative_position_buckets(1, 40, True, query_offset=20)[0]
    assert buckets[20] == 0 and buckets[19] == 1 and buckets[21] == 17  # 32 buckets: 16 a side
    assert buckets.max() < 32 and buckets.min() >= 0
    assert (np.diff(buckets[:20]) <= 0).all() and (np.diff(buckets[21:]) >= 0).all()


def test_distances_beyond_max_distance_share_the_last_bucket():
    far = ao.relative_position_bucket(-np.array([128, 500, 10_000]), False, 32, 128)
    np.testing.assert_array_equal(far, 31)


def test_max_distance_within_the_exact_buckets_is_refused_by_name():
    with pytest.raises(ValueError, match="max_distance 16 must exceed the 16 exact buckets"):
        ao.relative_position_bucket(np.arange(5), True, 64, 16)


def test_float16_attention_computes_in_float32_and_rounds_once():
    B, Tq, Tk, C, H = 2, 3, 5, 8, 2
    qkv, q, enc, w = randn(B, Tq, 3 * C), randn(B, Tq, C), randn(B, Tk, C), randn(C, 2 * C) / 4
    mask, bias = padding_mask(B, Tk, [5, 2]), randn(1, H, Tq, Tq)
    cases = [(lambda a: ao.self_attention_forward(a[0], H, mask[:, :Tq], a[1], True), (qkv, bias)),
             (lambda a: ao.cross_attention_forward(a[0], a[1], a[2], None, H, mask), (q, enc, w))]
    for forward, inputs in cases:
        reference, _ = forward([x.astype(np.float16).astype(np.float32) for x in inputs])
        half, cache = forward([x.astype(np.float16) for x in inputs])
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, reference.astype(np.float16))

"""BERT's and T5's ops give the values of transformers' modules (float64, CPU PyTorch).

transformers' Linear weights are (out, in); ringpipe's are (in, out) (Conv1D), hence the .T below.
"""
import numpy as np
import pytest

from ringpipe.model.nn import attention_ops as ao
from ringpipe.model.nn import encoder_decoder_ops as edo

torch = pytest.importorskip("torch", reason="comparing against transformers needs torch")
transformers = pytest.importorskip("transformers", reason="comparing needs transformers")
from transformers.models.bert import modeling_bert  # noqa: E402
from transformers.models.t5 import modeling_t5  # noqa: E402

RNG = np.random.default_rng(2024)


def randomized(module):
    """The module in float64 with every parameter drawn at random (not its init's zeros/ones)."""
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(RNG.standard_normal(tuple(p.shape))))
    return module


def numpy_of(p):
    return p.detach().numpy().copy()


def assert_close(ours, theirs, rtol=1e-12):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
    assert np.linalg.norm(ours - theirs) <= rtol * np.linalg.norm(theirs)


def bert_config(**overrides):
    config = transformers.BertConfig(vocab_size=11, hidden_size=8, num_attention_heads=2,
                                     max_position_embeddings=9, type_vocab_size=2,
                                     intermediate_size=16, **overrides)
    config._attn_implementation = "eager"
    return config


def test_bert_embeddings_match_transformers():
    module = randomized(modeling_bert.BertEmbeddings(bert_config()))
    ids, types = RNG.integers(0, 11, (2, 6)), RNG.integers(0, 2, (2, 6))
    with torch.no_grad():
        theirs = module(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types))
    ours, _ = edo.bert_embeddings_forward(
        ids, types, numpy_of(module.word_embeddings.weight),
        numpy_of(module.position_embeddings.weight), numpy_of(module.token_type_embeddings.weight),
        numpy_of(module.LayerNorm.weight), numpy_of(module.LayerNorm.bias),
        eps=module.LayerNorm.eps)
    assert_close(ours, theirs)


def test_bert_self_attention_with_a_padding_mask_matches_transformers():
    module = randomized(modeling_bert.BertSelfAttention(bert_config()))
    B, T, C = 2, 5, 8
    x = RNG.standard_normal((B, T, C))
    mask = (np.arange(T)[None, :] < np.array([[5], [3]])).astype(np.int64)
    with torch.no_grad():
        additive = torch.from_numpy(ao.padding_bias(mask, np.float64))  # (B, 1, 1, T)
        theirs, _ = module(torch.from_numpy(x), attention_mask=additive)
    weight = np.concatenate([numpy_of(getattr(module, n).weight).T
                             for n in ("query", "key", "value")], axis=1)
    bias = np.concatenate([numpy_of(getattr(module, n).bias) for n in ("query", "key", "value")])
    ours, _ = ao.self_attention_forward(x @ weight + bias, 2, mask)
    assert_close(ours, theirs)


def test_t5_layer_norm_matches_transformers():
    module = randomized(modeling_t5.T5LayerNorm(8, eps=1e-6))
    x = RNG.standard_normal((2, 3, 8)) * 4 + 1
    with torch.no_grad():
        theirs = module(torch.from_numpy(x))
    ours, _ = edo.rms_norm_forward(x, numpy_of(module.weight), eps=module.variance_epsilon)
    # transformers computes the mean square and its rsqrt in float32 even for float64 inputs, so
    # the two agree to float32's precision only (ours is float64 throughout: see
    # test_encoder_decoder_ops.py::test_rms_norm_neither_subtracts_the_mean_nor_adds_a_bias).
    assert_close(ours, theirs, rtol=1e-6)


def test_t5_gated_gelu_mlp_matches_transformers():
    config = transformers.T5Config(d_model=8, d_ff=12, feed_forward_proj="gated-gelu")
    module = randomized(modeling_t5.T5DenseGatedActDense(config))
    x = RNG.standard_normal((2, 3, 8))
    with torch.no_grad():
        theirs = module(torch.from_numpy(x))
    gate, up = x @ numpy_of(module.wi_0.weight).T, x @ numpy_of(module.wi_1.weight).T
    activated, _ = edo.gated_gelu_forward(gate, up)
    assert_close(activated @ numpy_of(module.wo.weight).T, theirs)


def test_t5_relu_mlp_matches_transformers():
    config = transformers.T5Config(d_model=8, d_ff=12, feed_forward_proj="relu")
    module = randomized(modeling_t5.T5DenseActDense(config))
    x = RNG.standard_normal((2, 3, 8))
    with torch.no_grad():
        theirs = module(torch.from_numpy(x))
    activated, _ = edo.relu_forward(x @ numpy_of(module.wi.weight).T)
    assert_close(activated @ numpy_of(module.wo.weight).T, theirs)


@pytest.mark.parametrize("bidirectional", [True, False])
# (18, 128) and (36, 32) put a distance where float64 logarithms pick another bucket than T5's
# float32 ones.
@pytest.mark.parametrize("num_buckets, max_distance",
                         [(32, 128), (8, 16), (64, 256), (6, 20), (18, 128), (36, 32)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    relative = np.arange(-2000, 2001)[None, :] - np.arange(0, 3)[:, None]
    theirs = modeling_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(relative), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance)
    ours = ao.relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, theirs.numpy())


@pytest.mark.parametrize("is_decoder", [False, True])
def test_relative_position_bias_matches_transformers_compute_bias(is_decoder):
    config = transformers.T5Config(d_model=8, d_kv=4, num_heads=2, is_decoder=is_decoder,
                                   relative_attention_num_buckets=16,
                                   relative_attention_max_distance=40)
    module = randomized(modeling_t5.T5Attention(config, has_relative_attention_bias=True))
    with torch.no_grad():
        theirs = module.compute_bias(7, 9, past_seen_tokens=2)
    buckets = ao.relative_position_buckets(7, 9, not is_decoder, 16, 40, query_offset=2)
    ours, _ = ao.relative_position_bias_forward(numpy_of(module.relative_attention_bias.weight),
                                                buckets)
    assert_close(ours, theirs, rtol=0)


def test_bert_gelu_is_transformers_gelu():
    x = RNG.standard_normal(50) * 4
    theirs = transformers.activations.ACT2FN["gelu"](torch.from_numpy(x))
    assert_close(edo.gelu_erf_forward(x)[0], theirs, rtol=1e-15)

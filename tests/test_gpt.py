"""The whole GPT: gradients, recompute, split backward, KV cache, generation, init, config."""
import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT

TINY = dict(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=7)


def batch(config, B=2, T=None, seed=0):
    rng = np.random.default_rng(seed)
    T = T or config.block_size
    return (rng.integers(0, config.vocab_size, (B, T)),
            rng.integers(0, config.vocab_size, (B, T)))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradients_match_finite_differences_in_float64(dropout):
    gpt = GPT(GPTConfig(**TINY, dtype="float64", dropout=dropout), seed=1)
    idx, targets = batch(gpt.config)
    targets[0, 2] = -1  # ignored position
    loss, grads = gpt.loss_and_grads(idx, targets, dropout_seed=5)

    def forward_loss():  # the forward of loss_and_grads alone (half its cost); the same dropout masks
        x, cache = gpt.embedding_forward(idx, 5)
        gpt.memory.release(cache)
        for i in range(gpt.config.n_layer):
            x, cache = gpt.block_forward(i, x, 5)
            gpt.memory.release(cache)
        value, cache = gpt.head_forward(x, targets)
        gpt.memory.release(cache)
        return value

    assert forward_loss() == loss  # the finite differences below see the loss the gradients are of
    rng, eps = np.random.default_rng(2), 1e-6
    for name, param in gpt.params.items():
        flat = param.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        numeric = np.empty(len(picks))
        for n, j in enumerate(picks):
            old = flat[j]
            flat[j] = old + eps
            plus = forward_loss()
            flat[j] = old - eps
            minus = forward_loss()
            flat[j] = old
            numeric[n] = (plus - minus) / (2 * eps)
        analytic = grads[name].reshape(-1)[picks]
        error = np.linalg.norm(analytic - numeric) / max(np.linalg.norm(numeric), 1e-12)
        assert error <= 1e-6, f"{name}: relative error {error:.2e}"


def test_grads_have_the_names_shapes_and_dtype_of_params():
    gpt = GPT(GPTConfig(**TINY))
    loss, grads = gpt.loss_and_grads(*batch(gpt.config))
    assert isinstance(loss, float)
    assert list(grads) == list(gpt.params)
    for name, g in grads.items():
        assert g.shape == gpt.params[name].shape and g.dtype == np.float32


def test_params_have_gpt2_names_and_shapes():
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=5, vocab_size=11))
    shapes = {name: p.shape for name, p in gpt.params.items()}
    assert shapes == {
        "wte.weight": (11, 8), "wpe.weight": (5, 8),
        "h.0.ln_1.weight": (8,), "h.0.ln_1.bias": (8,),
        "h.0.attn.c_attn.weight": (8, 24), "h.0.attn.c_attn.bias": (24,),
        "h.0.attn.c_proj.weight": (8, 8), "h.0.attn.c_proj.bias": (8,),
        "h.0.ln_2.weight": (8,), "h.0.ln_2.bias": (8,),
        "h.0.mlp.c_fc.weight": (8, 32), "h.0.mlp.c_fc.bias": (32,),
        "h.0.mlp.c_proj.weight": (32, 8), "h.0.mlp.c_proj.bias": (8,),
        "ln_f.weight": (8,), "ln_f.bias": (8,)}


def test_loss_at_init_is_near_uniform():
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    loss, _ = gpt.loss_and_grads(*batch(gpt.config, B=4))
    assert abs(loss - np.log(65)) < 0.1


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_gives_bitwise_identical_grads(dropout):
    config = dict(TINY, dropout=dropout)
    plain, recomputed = GPT(GPTConfig(**config)), GPT(GPTConfig(**config, recompute=True))
    idx, targets = batch(plain.config)
    loss_a, grads_a = plain.loss_and_grads(idx, targets, dropout_seed=3)
    loss_b, grads_b = recomputed.loss_and_grads(idx, targets, dropout_seed=3)
    assert loss_a == loss_b
    for name in grads_a:
        assert np.array_equal(grads_a[name], grads_b[name]), name


def test_recompute_lowers_peak_activation_memory_at_least_5x():
    config = dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=65)
    peaks = {}
    for recompute in (False, True):
        gpt = GPT(GPTConfig(**config, recompute=recompute))
        gpt.loss_and_grads(*batch(gpt.config, B=1))
        assert gpt.memory.live_bytes == 0  # every cache was freed
        peaks[recompute] = gpt.memory.peak_bytes
    assert peaks[False] >= 5 * peaks[True], peaks


def test_split_input_and_weight_backward_equals_fused():
    gpt = GPT(GPTConfig(**TINY, dtype="float64"))
    idx, _ = batch(gpt.config)
    x, _ = gpt.embedding_forward(idx)
    out, cache = gpt.block_forward(1, x)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    dx_fused, grads_fused = gpt.block_backward(1, cache, dout)
    _, cache = gpt.block_forward(1, x)
    dx_split, deferred = gpt.block_backward_input(1, cache, dout)
    assert np.array_equal(dx_split, dx_fused)
    assert not any(".weight" in n and "ln_" not in n for n in deferred.grads)  # linears deferred
    grads_split = gpt.block_backward_weight(deferred)
    assert grads_split.keys() == grads_fused.keys()
    for name in grads_fused:
        assert np.array_equal(grads_split[name], grads_fused[name]), name


def test_stages_compose_to_the_whole_model_logits():
    gpt = GPT(GPTConfig(**TINY))
    idx, _ = batch(gpt.config)
    x, _ = gpt.embedding_forward(idx)
    for i in range(gpt.config.n_layer):
        x, _ = gpt.block_forward(i, x)
    np.testing.assert_array_equal(gpt.head_logits(x), gpt.forward(idx))


def test_kv_cache_logits_equal_full_recomputation():
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=10, vocab_size=13,
                        dtype="float64"))
    idx, _ = batch(gpt.config, B=3)
    full = gpt.forward(idx)
    logits, kv = gpt.prefill(idx[:, :4])
    np.testing.assert_allclose(logits, full[:, :4], rtol=1e-10, atol=1e-12)
    for t in range(4, 10):
        step_logits = gpt.decode_step(kv, idx[:, t])
        np.testing.assert_allclose(step_logits, full[:, t], rtol=1e-10, atol=1e-12)


def test_generate_is_deterministic_with_a_seed_and_keeps_the_prompt():
    gpt = GPT(GPTConfig(**TINY))
    prompt = np.array([[1, 2], [3, 4]])
    a = gpt.generate(prompt, 12, temperature=0.8, top_k=4, seed=7)  # runs past block_size 6
    b = gpt.generate(prompt, 12, temperature=0.8, top_k=4, seed=7)
    assert a.shape == (2, 14) and np.array_equal(a, b)
    assert np.array_equal(a[:, :2], prompt)
    assert a.min() >= 0 and a.max() < gpt.config.vocab_size


def test_greedy_generation_past_block_size_matches_cropped_recomputation():
    gpt = GPT(GPTConfig(**TINY), seed=4)
    tokens = np.array([[1, 2, 3]])
    generated = gpt.generate(tokens, 8, temperature=0)
    for _ in range(8):
        logits = gpt.forward(tokens[:, -gpt.config.block_size:])
        tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(generated, tokens)


def test_init_is_deterministic_and_the_same_for_every_dtype():
    a = GPT(GPTConfig(**TINY, dtype="float64"), seed=9)
    b = GPT(GPTConfig(**TINY, dtype="float32"), seed=9)
    c = GPT(GPTConfig(**TINY, dtype="float32"), seed=10)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name].astype(np.float32), b.params[name])
    assert not np.array_equal(b.params["wte.weight"], c.params["wte.weight"])


def test_init_follows_gpt2():
    gpt = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=128, block_size=64, vocab_size=512,
                        dtype="float64"))
    p = gpt.params
    assert abs(p["wte.weight"].std() - 0.02) < 0.001
    assert abs(p["h.0.mlp.c_proj.weight"].std() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert abs(p["h.0.attn.c_proj.weight"].std() - 0.02 / 4) < 0.0005
    assert np.all(p["h.3.ln_1.weight"] == 1) and np.all(p["h.3.attn.c_attn.bias"] == 0)


@pytest.mark.parametrize("change, message", [
    (dict(n_embd=10, n_head=4), "n_embd=10 is not divisible by n_head=4"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(vocab_size=2.5), "vocab_size must be a positive int"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(dtype="bfloat16"), "dtype must be one of"),
    (dict(device="tpu"), "device must be one of"),
])
def test_config_validation_names_the_bad_field(change, message):
    with pytest.raises(ValueError) as info:
        GPTConfig(**{**TINY, **change})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_sequence_longer_than_block_size_is_rejected():
    gpt = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds block_size 6"):
        gpt.forward(np.zeros((1, 7), dtype=np.int64))


def test_batch_shards_on_threads_give_the_same_loss_and_grads():
    serial = GPT(GPTConfig(**TINY, dtype="float64"))
    threaded = GPT(GPTConfig(**TINY, dtype="float64"), threads=2)
    idx, targets = batch(serial.config, B=3)
    targets[0, :4] = -1  # shards with different numbers of counted targets
    loss_a, grads_a = serial.loss_and_grads(idx, targets)
    loss_b, grads_b = threaded.loss_and_grads(idx, targets)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-14)
    assert threaded.memory.live_bytes == 0


def test_recompute_on_threads_gives_bitwise_identical_grads():
    plain = GPT(GPTConfig(**TINY, dropout=0.1), threads=2)
    recomputed = GPT(GPTConfig(**TINY, dropout=0.1, recompute=True), threads=2)
    idx, targets = batch(plain.config, B=4)
    grads_a = plain.loss_and_grads(idx, targets, dropout_seed=1)[1]
    grads_b = recomputed.loss_and_grads(idx, targets, dropout_seed=1)[1]
    for name in grads_a:
        assert np.array_equal(grads_a[name], grads_b[name]), name


def test_inference_ignores_dropout():
    gpt = GPT(GPTConfig(**TINY, dropout=0.5))
    idx, _ = batch(gpt.config)
    np.testing.assert_array_equal(gpt.forward(idx), gpt.forward(idx))

import math

import numpy as np
import pytest

from ringpipe.model.nn.optim import AdamW, FlatArrays, adamw_update, clip_grad_norm, flat_order, lr_at


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    """AdamW written out scalar by scalar, as in Loshchilov & Hutter / torch.optim.AdamW."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    return p - lr * m_hat / (math.sqrt(v_hat) + eps), m, v


def test_adamw_update_matches_hand_computed_reference_over_steps():
    rng = np.random.default_rng(0)
    param, m, v = rng.standard_normal(6), np.zeros(6), np.zeros(6)
    expected = [(float(x), 0.0, 0.0) for x in param]
    for t in range(1, 6):
        grad = rng.standard_normal(6)
        adamw_update(param, grad, m, v, t, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                     weight_decay=0.1)
        expected = [reference_adamw(pe, g, me, ve, t, 0.01, 0.9, 0.99, 1e-8, 0.1)
                    for (pe, me, ve), g in zip(expected, grad)]
    np.testing.assert_allclose(param, [e[0] for e in expected], rtol=1e-13)
    np.testing.assert_allclose(m, [e[1] for e in expected], rtol=1e-13)
    np.testing.assert_allclose(v, [e[2] for e in expected], rtol=1e-13)


def test_first_adamw_step_moves_each_weight_by_lr_against_its_gradient_sign():
    param = np.zeros(3)
    adamw_update(param, np.array([2.0, -0.5, 1e-3]), np.zeros(3), np.zeros(3), 1, lr=0.1)
    np.testing.assert_allclose(param, [-0.1, 0.1, -0.1], rtol=1e-4)


def test_weight_decay_applies_to_2d_weights_only():
    params = {"wte.weight": np.ones((4, 3)), "h.0.ln_1.weight": np.ones(3),
              "h.0.attn.c_attn.bias": np.ones(9)}
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    AdamW(params, weight_decay=0.5).update(params, grads, lr=0.1)
    np.testing.assert_allclose(params["wte.weight"], 0.95)
    np.testing.assert_array_equal(params["h.0.ln_1.weight"], 1.0)
    np.testing.assert_array_equal(params["h.0.attn.c_attn.bias"], 1.0)


def test_flat_shard_update_equals_per_parameter_update():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = {name: rng.standard_normal(p.shape) for name, p in params.items()}
    flat = np.concatenate([params["w"].ravel(), params["b"]])
    decay = np.concatenate([np.full(12, 0.1), np.zeros(4)])
    adamw_update(flat, np.concatenate([grads["w"].ravel(), grads["b"]]), np.zeros(16),
                 np.zeros(16), 1, lr=0.01, weight_decay=decay)
    AdamW(params, weight_decay=0.1).update(params, grads, lr=0.01)
    np.testing.assert_allclose(flat, np.concatenate([params["w"].ravel(), params["b"]]),
                               rtol=1e-15)


def test_float32_parameters_stay_float32():
    param = np.ones(4, dtype=np.float32)
    m, v = np.zeros_like(param), np.zeros_like(param)
    adamw_update(param, np.ones(4, dtype=np.float32), m, v, 1, lr=0.1, weight_decay=0.1)
    assert param.dtype == m.dtype == v.dtype == np.float32


def test_optimizer_state_round_trips_through_a_dict():
    rng = np.random.default_rng(2)
    params = {"w": rng.standard_normal((2, 2)), "b": rng.standard_normal(2)}
    first = AdamW(params, weight_decay=0.1)
    for _ in range(3):
        first.update(params, {n: rng.standard_normal(p.shape) for n, p in params.items()}, 0.01)
    second = AdamW(params, weight_decay=0.1)
    second.load_state_dict(first.state_dict())
    assert second.step_count == 3
    grads = {n: rng.standard_normal(p.shape) for n, p in params.items()}
    a = {n: p.copy() for n, p in params.items()}
    b = {n: p.copy() for n, p in params.items()}
    first.update(a, grads, 0.01)
    second.update(b, grads, 0.01)
    assert all(np.array_equal(a[n], b[n]) for n in params)


def test_optimizer_state_with_wrong_shape_is_rejected():
    optimizer = AdamW({"w": np.zeros((2, 2))})
    state = optimizer.state_dict()
    state["m.w"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"'m.w' has shape \(3, 2\), expected \(2, 2\)"):
        optimizer.load_state_dict(state)


def test_clipping_scales_to_max_norm_and_returns_the_norm_before():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_grad_norm(grads, max_norm=1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-5)


def test_clipping_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(grads, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(grads["a"], [0.3, 0.4])


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    lrs = [lr_at(s, 1.0, 0.1, warmup=10, total_steps=110) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: midpoint of lr and min_lr
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[110:] == [0.1] * 10


def _flat_copy(arrays):
    shapes = {name: a.shape for name, a in arrays.items()}
    flat = FlatArrays(np.empty(sum(a.size for a in arrays.values())), shapes, flat_order(arrays))
    for name, a in arrays.items():
        flat[name][...] = a
    return flat


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_flat_update_equals_per_parameter_update_bitwise(threads):
    rng = np.random.default_rng(3)
    params = {"b": rng.standard_normal(5), "w": rng.standard_normal((3, 4)),
              "g": rng.standard_normal(2), "e": rng.standard_normal((2, 3))}
    flat_params = _flat_copy(params)
    per_param = AdamW(params, weight_decay=0.1)
    flat = AdamW(flat_params, weight_decay=0.1, threads=threads)
    for _ in range(3):
        grads = {n: rng.standard_normal(p.shape) for n, p in params.items()}
        per_param.update(params, grads, lr=0.01)
        flat.update(flat_params, _flat_copy(grads), lr=0.01)
    for name in params:
        np.testing.assert_array_equal(flat_params[name], params[name])
        np.testing.assert_array_equal(flat.m[name], per_param.m[name])


def test_flat_params_with_a_rebound_entry_are_updated_one_by_one():
    params = _flat_copy({"w": np.ones((2, 2)), "b": np.ones(2)})
    optimizer = AdamW(params, weight_decay=0.5)
    params["w"] = np.ones((2, 2))  # no longer a view of params.flat
    optimizer.update(params, _flat_copy({"w": np.zeros((2, 2)), "b": np.zeros(2)}), lr=0.1)
    np.testing.assert_allclose(params["w"], 0.95)

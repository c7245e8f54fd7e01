"""float32 products with the inner dimension cut into blocks (model/nn/gemm_blocking.py)."""
import numpy as np
import pytest

from ringpipe.model.nn import gemm_blocking, ops


@pytest.fixture
def split(monkeypatch):
    """Set whether this process blocks small float32 products, as RINGPIPE_GEMM_SPLIT_K does."""
    def set_to(value: bool):
        monkeypatch.setattr(gemm_blocking, "_splitting", value)
    return set_to


@pytest.mark.parametrize("m,k,n", [(128, 256, 128), (64, 129, 96), (7, 1000, 5), (128, 384, 192)])
def test_a_blocked_product_equals_the_plain_one_to_float32_rounding(m, k, n):
    rng = np.random.default_rng(k)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    for result in (gemm_blocking.blocked(a, b), a @ b):
        assert result.dtype == np.float32 and result.shape == (m, n)
        assert np.all(np.abs(result - exact) <= 4 * k * np.finfo(np.float32).eps * scale)


def test_weight_gradients_of_transposed_views_are_blocked_when_this_blas_needs_it(split):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 128), dtype=np.float32)  # (tokens, in)
    dout = rng.standard_normal((256, 192), dtype=np.float32)
    split(True)
    dweight, _ = ops.linear_backward_weight(dout, x)
    assert np.array_equal(dweight, gemm_blocking.blocked(x.T, dout))
    split(False)
    dweight, _ = ops.linear_backward_weight(dout, x)
    assert np.array_equal(dweight, x.T @ dout)


def test_large_outputs_short_inner_dimensions_other_dtypes_and_batches_are_plain_products(split):
    split(True)
    rng = np.random.default_rng(1)
    cases = [(rng.standard_normal((384, 256), dtype=np.float32), rng.standard_normal((256, 384), dtype=np.float32)),
             (rng.standard_normal((64, 128), dtype=np.float32), rng.standard_normal((128, 64), dtype=np.float32)),
             (rng.standard_normal((64, 256)), rng.standard_normal((256, 64))),
             (rng.standard_normal((3, 64, 256), dtype=np.float32), rng.standard_normal((256, 64), dtype=np.float32))]
    for a, b in cases:
        assert np.array_equal(ops.matmul(a, b), a @ b)


def test_float16_products_are_blocked_in_float32_and_rounded_once(split):
    split(True)
    rng = np.random.default_rng(2)
    a = rng.standard_normal((128, 256)).astype(np.float16)
    b = rng.standard_normal((256, 128)).astype(np.float16)
    result = ops.matmul(a, b)
    assert result.dtype == np.float16
    assert np.array_equal(result, gemm_blocking.blocked(a.astype(np.float32), b.astype(np.float32)).astype(np.float16))


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False)])
def test_the_environment_forces_blocking_on_or_off_without_measuring(monkeypatch, value, expected):
    monkeypatch.setattr(gemm_blocking, "_splitting", None)
    monkeypatch.setenv("RINGPIPE_GEMM_SPLIT_K", value)
    monkeypatch.setattr(gemm_blocking, "_probe", lambda: pytest.fail("measured although forced"))
    assert gemm_blocking.splitting() is expected


def test_the_probe_measures_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(gemm_blocking, "_splitting", None)
    monkeypatch.delenv("RINGPIPE_GEMM_SPLIT_K", raising=False)
    monkeypatch.setattr(gemm_blocking, "_probe", lambda: calls.append(1) or True)
    assert gemm_blocking.splitting() and gemm_blocking.splitting()
    assert calls == [1]


def test_the_probe_blocks_only_when_the_blocked_product_is_the_faster(monkeypatch):
    import time

    monkeypatch.setattr(gemm_blocking, "blocked", lambda a, b: None)  # free: far under 0.7× the product
    assert gemm_blocking._probe() is True
    monkeypatch.setattr(gemm_blocking, "blocked", lambda a, b: time.sleep(0.01))  # slower than the product
    assert gemm_blocking._probe() is False


def test_an_operand_that_is_not_an_array_multiplies_itself(split):
    split(True)

    class Weight:  # as the int8 weights: `x @ w` calls w.__rmatmul__(x)
        __array_ufunc__ = None
        def __rmatmul__(self, x):
            return ("rmatmul", x.shape)

    assert ops.matmul(np.ones((4, 256), np.float32), Weight()) == ("rmatmul", (4, 256))

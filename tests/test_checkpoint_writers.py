"""The writers of what replicas hold alike are balanced by bytes (model/training/checkpoint_writers.py)."""
import pytest

from ringpipe.model.training.checkpoint_writers import plan_writers, writes


def gpt2_like(n_layer=2, d=64, vocab=500):
    """(name, bytes, replicated over tp) in sorted order: biases and weights alternate, as in GPT-2."""
    shapes = {"wte": (vocab, d), "wpe": (64, d), "ln_f.bias": (d,), "ln_f.weight": (d,)}
    for i in range(n_layer):
        for part, shape in (("attn.c_attn.bias", (3 * d,)), ("attn.c_attn.weight", (d, 3 * d)),
                            ("attn.c_proj.bias", (d,)), ("attn.c_proj.weight", (d, d)), ("ln_1.bias", (d,)),
                            ("ln_1.weight", (d,)), ("mlp.c_fc.bias", (4 * d,)), ("mlp.c_fc.weight", (d, 4 * d)),
                            ("mlp.c_proj.bias", (d,)), ("mlp.c_proj.weight", (4 * d, d))):
            shapes[f"h.{i}.{part}"] = shape
    sizes = {name: 4 * int.__mul__(*shape) if len(shape) == 2 else 4 * shape[0] for name, shape in shapes.items()}
    return [(name, sizes[name], "ln" in name or name.endswith("proj.bias")) for name in sorted(shapes)]


@pytest.mark.parametrize("dp, tp, zero", [(2, 1, False), (4, 1, False), (2, 2, False), (2, 2, True), (3, 2, True)])
def test_every_tensor_has_one_writer_and_writers_are_balanced_within_the_largest_tensor(dp, tp, zero):
    tensors = gpt2_like()
    plan = plan_writers(tensors, dp, tp, zero)
    for name, nbytes, replicated in tensors:
        writers = [(d, t) for d in range(dp) for t in range(tp) if writes(plan, name, d, t)]
        assert len(writers) == (1 if replicated else tp), name
        if zero and replicated:
            assert 0 <= plan.moments[name] < tp
    loads = [load for row in plan.loads for load in row]
    largest = max(3 * nbytes for _, nbytes, _ in tensors)
    assert max(loads) - min(loads) <= largest
    assert max(loads) <= 1.5 * sum(loads) / len(loads)  # round robin over sorted names gave 12x with dp 2


def test_the_plan_is_the_same_whatever_the_order_of_the_tensors():
    tensors = gpt2_like()
    assert plan_writers(tensors, 2, 2, True) == plan_writers(tensors[::-1], 2, 2, True)

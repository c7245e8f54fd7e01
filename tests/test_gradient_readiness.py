"""When a stage reports gradients as final (data-parallel buckets start reducing them then): in the
step's last weight backward, a block's gradients go a linear at a time, the largest first, so what
is left to reduce after backward is the block's smallest linear, not the whole block."""
import numpy as np

from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.parallel.stage import Stage


def _backward(report: bool):
    config = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=16, block_size=8)
    stage = Stage(GPT2ParallelPlan(config), init_params(config), range(2), True, True)
    reports = []
    if report:
        stage.on_grads_final = reports.append
    idx = np.random.default_rng(0).integers(0, 65, (2, 8))
    _, caches = stage.forward(idx, idx)
    _, deferred = stage.backward_input(caches, 1.0, last=True)
    stage.backward_weight(deferred, last=True)
    return stage, reports


def test_a_blocks_gradients_are_reported_a_linear_at_a_time_the_smallest_linear_last():
    stage, reports = _backward(report=True)
    block_reports = [names for names in reports if names[0].startswith("h.")]
    for layer in (1, 0):
        mine = [names for names in block_reports if names[0].startswith(f"h.{layer}.")]
        assert len(mine) == 5  # what backward_input knew (the layer norms), then four linears
        assert mine[-1] == [f"h.{layer}.attn.c_proj.weight", f"h.{layer}.attn.c_proj.bias"]
        assert {n for names in mine[1:] for n in names} == {
            f"h.{layer}.{linear}.{kind}" for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            for kind in ("weight", "bias")}
    reported = [name for names in reports for name in names]
    assert sorted(reported) == sorted(stage.params)  # each exactly once


def test_gradients_reported_in_parts_are_bitwise_those_of_one_report_per_block():
    parts, _ = _backward(report=True)
    whole, _ = _backward(report=False)
    for name in whole.grads:
        np.testing.assert_array_equal(parts.grads[name], whole.grads[name], err_msg=name)

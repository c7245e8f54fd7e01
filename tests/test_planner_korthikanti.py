"""Set to Megatron-LM's storage choices, the planner's per-tensor activation inventory of a GPT-2
layer adds up to Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Table 2): bytes per layer with s sequence, b micro-batch, h hidden, a heads, t tp size."""
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.planning.activations import MEGATRON_STORAGE, total_bytes
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory

s, b, h, a = 2048, 4, 1024, 16


def layer_bytes(t=1, sp=False, selective=False, full=False):
    inventory = GPT2Inventory(GPTConfig(n_layer=2, n_head=a, n_embd=h, block_size=s, dropout=0.1, dtype="float16"))
    tensors = (inventory.recompute_tensors(b, s, t, sp) if full
               else inventory.block_tensors(b, s, t, sp, MEGATRON_STORAGE))
    return total_bytes(tensors, MEGATRON_STORAGE, "float16", selective_recompute=selective)


def test_a_layer_without_parallelism_holds_34sbh_plus_5as2b():
    assert layer_bytes() == 34 * s * b * h + 5 * a * s * s * b


@pytest.mark.parametrize("t", [2, 4, 8])
def test_tensor_parallelism_divides_all_but_10sbh(t):
    assert layer_bytes(t) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


@pytest.mark.parametrize("t", [2, 8])
def test_sequence_parallelism_divides_everything_by_t(t):
    assert layer_bytes(t, sp=True) == s * b * h * (34 / t + 5 * a * s / (h * t))


@pytest.mark.parametrize("t", [1, 8])
def test_selective_recompute_drops_the_attention_core(t):
    assert layer_bytes(t, selective=True) == s * b * h * (10 + 24 / t)
    assert layer_bytes(t, sp=True, selective=True) == pytest.approx(34 * s * b * h / t)


def test_full_recompute_keeps_the_layer_input_only():
    assert layer_bytes(full=True) == 2 * s * b * h

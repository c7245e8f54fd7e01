"""The model families the planner knows, each through one small interface (GPT-2's is
model/planning/gpt2_inventory.py; BERT and T5 plug in with a class of the same members):

    family                          the --model name
    config                          its config (n_layer, n_embd, block_size, vocab_size, dtype, dropout, mlp_width)
    plan                            its parallel plan (model/parallel/plan.py): names, shardings, ties
    param_shapes()                  {name: full shape}
    embedding_tensors(B, T, tp, sp) / block_tensors(B, T, tp, sp, storage) / head_tensors(...)
                                    the `Tensor`s each piece caches for its backward
    recompute_tensors(B, T, tp, sp), recompute_halves(tensors, tp), deferred_tensors(B, T, tp)
    block_flops(B, T, tp), head_flops(B, T, tp), block_elements(B, T, tp)
"""
from __future__ import annotations

from ringpipe.model.planning.gpt2_inventory import GPT2Inventory

FAMILIES = {"gpt2": GPT2Inventory}


def inventory_for(family: str, config):
    """The planner's inventory of a `family` model of `config`; ValueError for an unknown family."""
    if family not in FAMILIES:
        raise ValueError(f"the planner has no inventory for model family {family!r}; it knows "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[family](config)

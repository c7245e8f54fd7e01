"""The model families the planner knows, each through one small interface (GPT-2's is
model/planning/gpt2_inventory.py, BERT's bert_inventory.py; another family plugs in with a class of
the same members and one line in FAMILIES):

    family                          the --model name
    config                          its config (n_layer, n_embd, block_size, vocab_size, dtype, dropout, mlp_width)
    plan                            its parallel plan (model/parallel/plan.py): names, shardings, ties
    param_shapes()                  {name: full shape}
    embedding_tensors(B, T, tp, sp) / block_tensors(B, T, tp, sp, storage) / head_tensors(...)
                                    the `Tensor`s each piece caches for its backward
    recompute_tensors(B, T, tp, sp), recompute_halves(tensors, tp), deferred_tensors(B, T, tp)
    block_flops(B, T, tp), head_flops(B, T, tp), block_elements(B, T, tp)
    recompute                       False where the family has no recompute (the planner offers none)
"""
from __future__ import annotations

import importlib

# --model NAME -> "module:class" of its inventory, imported when asked for
FAMILIES = {"gpt2": "ringpipe.model.planning.gpt2_inventory:GPT2Inventory",
            "bert": "ringpipe.model.planning.bert_inventory:BertInventory"}


def inventory_for(family: str, config):
    """The planner's inventory of a `family` model of `config`; ValueError for an unknown family."""
    if family not in FAMILIES:
        raise ValueError(f"the planner has no inventory for model family {family!r}; it knows "
                         f"{', '.join(sorted(FAMILIES))}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)(config)

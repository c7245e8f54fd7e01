"""The model families `ringpipe train --model NAME` can train, and what the trainers ask each one.

A family lives in its own folder (model/gpt2/, model/bert/, ...) and describes itself by one
`Family` object, `FAMILY` in its `family.py`; `FAMILIES` below names those modules, so adding a
family is a folder and one line here. The single-process Trainer, the worker-side ParallelTrainer
and the CLI ask `family(name)` for everything family-specific and name no family themselves:

    options, default_options()   the dataclass of what a run chooses (TrainConfig.model, the
                                 `--n-layer`... flags) and a small default that trains on a CPU
    config(**options, vocab_size=, dtype=, device=)   the model's full config
    architecture_fields          config fields that decide what the weights compute (a resumed
                                 run's must equal its checkpoint's)
    model                        the dense model: model(config, seed=, params=, threads=) with
                                 .config, .params, .xp, .loss_and_grads(inputs, targets,
                                 dropout_seed=, dloss=), .loss(inputs, targets) (inference, the
                                 training loss's definition), .forward(inputs) -> logits,
                                 .save_pretrained(dir, tokenizer=), .from_pretrained(dir, dtype=,
                                 device=)
    init_params(config, seed)    {name: float64 host array}, the same whatever the layout
    write_checkpoint_files(dir, params, config, tokenizer)  its Hugging Face format, into a
                                 (staging) directory; load_checkpoint(dir, dtype=, device=) ->
                                 (config, params) reads it back
    parallel_plan(config)        its model/parallel/plan.py ParallelPlan
    objective(train_config, vocab_size, special_ids)  how token windows become (inputs, targets):
                                 an object whose .batch(dataset, split, index) gives the GLOBAL
                                 batch of `index`, a function of (seed, index, split) only, so
                                 every layout and a resumed run see the same batches; vocab_size
                                 and special_ids ({role: id}) are the run's tokenizer's
    hf_config(config)            optional: the config.json of its Hugging Face format
    weights_metadata(config)     optional: the safetensors metadata of its model.safetensors; with
                                 hf_config, lets the export stream the weights from a sharded
                                 checkpoint (model/training/hf_export.py) instead of loading them
    hf_tensors(config)           optional: where each tensor of model.safetensors lies in the
                                 parameters, in the file's order: [(Hugging Face key, parameter
                                 name, columns: a slice of its last axis or None, transposed)]
                                 (`hf_part` takes one out); without it, each parameter as it is
                                 under its plan's hf_name
    ignore_index                 the target value that carries no loss
    special_tokens               {transformers role: token text} added to any tokenizer
                                 (model/data/hf_tokenizer.py's with_special_tokens); {} for none
    additional_tokens            further special tokens added after them, in order (T5's sentinels)

A checkpoint records its family as config.json's `model_type` (`checkpoint_family`).
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

# --model NAME -> the module whose FAMILY describes it.
FAMILIES = {
    "gpt2": "ringpipe.model.gpt2.family",
    "bert": "ringpipe.model.bert.family",
    "t5": "ringpipe.model.t5.family",
}
DEFAULT_FAMILY = "gpt2"
CONFIG_FILE = "config.json"  # Hugging Face's name; every family's checkpoint has one


@dataclass(frozen=True)
class Family:
    """One model family, as the trainers see it (see the module docstring for each member)."""
    name: str
    options: type
    default_options: Callable[[], Any]
    config: Callable[..., Any]
    architecture_fields: tuple
    model: type
    init_params: Callable[[Any, int], dict]
    write_checkpoint_files: Callable[..., None]
    load_checkpoint: Callable[..., tuple]
    parallel_plan: Callable[[Any], Any]
    objective: Callable[[Any, int, dict], Any]
    ignore_index: int = -1
    special_tokens: dict = field(default_factory=dict)
    additional_tokens: tuple = ()
    hf_config: Callable[[Any], dict] | None = None
    weights_metadata: Callable[[Any], dict] | None = None
    hf_tensors: Callable[[Any], list] | None = None


def hf_part(array, columns: slice | None, transposed: bool):
    """One Hugging Face tensor of a parameter (`Family.hf_tensors`): its `columns` (last axis), maybe
    transposed, C-contiguous (a view when nothing moves)."""
    import numpy as np

    part = array if columns is None else array[..., columns]
    if transposed:
        return np.ascontiguousarray(part.T)
    return part if columns is None else np.ascontiguousarray(part)


def family(name: str) -> Family:
    """The family `--model name` trains; ValueError naming the known ones for any other name."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (--model); expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY


def special_ids(tokenizer, model_family: Family) -> dict:
    """{role: id} of the family's special tokens and {text: id} of its additional tokens in
    `tokenizer` (which must hold them)."""
    return {**{role: tokenizer.token_id(text) for role, text in model_family.special_tokens.items()},
            **{text: tokenizer.token_id(text) for text in model_family.additional_tokens}}


def checkpoint_family(directory: str) -> str | None:
    """The family a checkpoint directory holds: its config.json's model_type (None if unreadable;
    the family's own reader then says what is wrong)."""
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def check_checkpoint_family(directory: str, name: str) -> None:
    """ValueError in one line if the checkpoint in `directory` holds another family than `name`."""
    found = checkpoint_family(directory)
    if found is not None and found != name:
        raise ValueError(f"checkpoint {directory} holds a {found} model, not {name} (--model {name}); "
                         f"resume it with --model {found}, or start a new run in another --out")

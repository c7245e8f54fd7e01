"""GPT-2 as a model family (model/families.py): a decoder-only language model, next-token objective."""
from __future__ import annotations

from ringpipe.model.families import Family
from ringpipe.model.gpt2.checkpoint import hf_config, load_checkpoint, weights_metadata, write_checkpoint_files
from ringpipe.model.gpt2.config import ARCHITECTURE_FIELDS, GPTConfig, GPTOptions, init_params
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan


def small_gpt() -> GPTOptions:
    """A run's default model: GPT-2's options at a size that trains in minutes on a CPU."""
    return GPTOptions(n_layer=4, n_head=4, n_embd=128, block_size=64)


class NextToken:
    """The causal language-model objective: each position predicts the token after it."""

    def __init__(self, config, vocab_size: int = 0, special_ids: dict | None = None):
        self.config = config

    def batch(self, dataset, split: str, index: int):
        """-> inputs, targets int64 (batch_size, block_size), targets = inputs shifted by one."""
        c = self.config
        return dataset.get_batch(split, index, c.batch_size, c.model.block_size, c.seed, c.sampler)


FAMILY = Family(name="gpt2", options=GPTOptions, default_options=small_gpt, config=GPTConfig,
                architecture_fields=ARCHITECTURE_FIELDS, model=GPT, init_params=init_params,
                write_checkpoint_files=write_checkpoint_files, load_checkpoint=load_checkpoint,
                parallel_plan=GPT2ParallelPlan, objective=NextToken, ignore_index=-1, hf_config=hf_config,
                weights_metadata=weights_metadata)

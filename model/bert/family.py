"""BERT as a model family (model/families.py): a bidirectional encoder, masked-LM objective."""
from __future__ import annotations

from ringpipe.model.bert.checkpoint import hf_tensors, load_checkpoint, weights_metadata, write_checkpoint_files
from ringpipe.model.bert.config import ARCHITECTURE_FIELDS, BertConfig, BertOptions, init_params
from ringpipe.model.bert.hf_config import hf_config
from ringpipe.model.bert.model import Bert
from ringpipe.model.bert.parallel_plan import BertParallelPlan
from ringpipe.model.data.masking import IGNORE_INDEX, SPECIAL_TOKENS, MaskedLM
from ringpipe.model.families import Family


def small_bert() -> BertOptions:
    """A run's default BERT: the size of the default GPT-2, which trains in minutes on a CPU."""
    return BertOptions(n_layer=4, n_head=4, n_embd=128, block_size=64)


FAMILY = Family(name="bert", options=BertOptions, default_options=small_bert, config=BertConfig,
                architecture_fields=ARCHITECTURE_FIELDS, model=Bert, init_params=init_params,
                write_checkpoint_files=write_checkpoint_files, load_checkpoint=load_checkpoint,
                parallel_plan=BertParallelPlan, objective=MaskedLM, ignore_index=IGNORE_INDEX,
                special_tokens=SPECIAL_TOKENS, hf_config=hf_config, weights_metadata=weights_metadata,
                hf_tensors=hf_tensors)

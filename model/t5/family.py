"""T5 as a model family (model/families.py): an encoder-decoder, span-corruption objective.

The trainers hand a model one inputs array and one targets array per batch; T5's inputs are packed
as [encoder ids | decoder input ids] along the sequence (model/t5/model.py splits them at
config.encoder_length), its targets are the span-corruption targets, which the decoder reads
shifted right (teacher forcing). Every window of block_size tokens corrupts to the same lengths,
so batches need no padding.

Its special tokens, appended to any tokenizer in this order: <pad> (also the decoder's start
token), </s>, then T5's 100 sentinels <extra_id_0> … <extra_id_99>. The model config takes their
ids from that order (the vocabulary's tail); the objective checks that the tokenizer agrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ringpipe.model.data.span_corruption import T5_ROLES, SpanCorruption, sentinel_tokens
from ringpipe.model.families import Family
from ringpipe.model.parallel.pipeline_parallel.schedules import split_layers
from ringpipe.model.t5.checkpoint import hf_tensors, load_checkpoint, weights_metadata, write_checkpoint_files
from ringpipe.model.t5.config import ARCHITECTURE_FIELDS, T5Config, init_params
from ringpipe.model.t5.hf_config import hf_config
from ringpipe.model.t5.layers import IGNORE_INDEX
from ringpipe.model.t5.model import T5, shift_right
from ringpipe.model.t5.parallel_plan import T5ParallelPlan

SENTINELS = 100  # T5's extra_ids
SPECIAL_TOKENS = dict(T5_ROLES)  # pad_token, eos_token
ADDITIONAL_TOKENS = tuple(sentinel_tokens(SENTINELS))


@dataclass
class T5Options:
    """What a run chooses about its T5, by the flags' names: n_embd is d_model, n_layer the encoder's
    layers (and the decoder's unless n_decoder_layer), n_inner d_ff (None: 4 × n_embd), d_kv None is
    n_embd / n_head, block_size the window before span corruption."""
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 512
    dropout: float = 0.0  # T5Config.dropout_rate
    n_inner: int | None = None
    n_decoder_layer: int | None = None
    d_kv: int | None = None
    feed_forward_proj: str = "relu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    @property
    def pipeline_layers(self) -> int:
        """Layers the pipeline stages divide: the encoder's, then the decoder's."""
        return self.n_layer + (self.n_layer if self.n_decoder_layer is None else self.n_decoder_layer)


def encoder_decoder_split(options: T5Options, num_stages: int, encoder_stages: int) -> list[int]:
    """Layers per pipeline stage with the encoder's on the first `encoder_stages` stages and the
    decoder's on the rest, each balanced (`--encoder-stages`); ValueError naming what cannot be."""
    decoder_layers = options.pipeline_layers - options.n_layer
    decoder_stages = num_stages - encoder_stages
    if decoder_stages < 1:
        raise ValueError(f"--encoder-stages {encoder_stages} leaves the decoder no stage of the "
                         f"{num_stages} pipeline stages")
    for stack, stages, layers in (("encoder", encoder_stages, options.n_layer),
                                  ("decoder", decoder_stages, decoder_layers)):
        if stages > layers:
            raise ValueError(f"--encoder-stages {encoder_stages} gives {stages} {stack} stages but "
                             f"the {stack} has {layers} layers (at least one per stage)")
    return [len(r) for r in split_layers(options.n_layer, encoder_stages)] + \
        [len(r) for r in split_layers(decoder_layers, decoder_stages)]


def small_t5() -> T5Options:
    """A run's default T5, about the default GPT-2's size."""
    return T5Options(n_layer=2, n_head=4, n_embd=128, block_size=64)


def t5_config(**fields) -> T5Config:
    """The family's config: from a run's options (T5Options' fields, vocab_size, dtype, device), or
    from a T5Config's own fields (a checkpoint's record of its model)."""
    if "d_model" in fields:
        return T5Config(**fields)
    return _config_of_options(**fields)


def _config_of_options(n_layer, n_head, n_embd, block_size, dropout, n_inner, n_decoder_layer, d_kv,
                       feed_forward_proj, relative_attention_num_buckets,
                       relative_attention_max_distance, vocab_size, dtype="float32",
                       device="cpu") -> T5Config:
    if d_kv is None and n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
    pad = vocab_size - SENTINELS - 2  # where with_special_tokens appends them (module docstring)
    return T5Config(vocab_size=vocab_size, d_model=n_embd, d_kv=d_kv or n_embd // n_head,
                    d_ff=n_inner or 4 * n_embd, num_layers=n_layer,
                    num_decoder_layers=n_decoder_layer, num_heads=n_head,
                    relative_attention_num_buckets=relative_attention_num_buckets,
                    relative_attention_max_distance=relative_attention_max_distance,
                    dropout_rate=dropout, feed_forward_proj=feed_forward_proj, pad_token_id=max(pad, 0),
                    decoder_start_token_id=max(pad, 0), eos_token_id=max(pad + 1, 0),
                    block_size=block_size, dtype=dtype, device=device)


class SpanCorruptionObjective:
    """Batches of span-corrupted windows: inputs packed [encoder ids | decoder input ids] (B,
    Te + Td), targets (B, Td)."""

    def __init__(self, config, *tokenizer_facts):
        special_ids = tokenizer_facts[-1] if tokenizer_facts else {}  # (vocab_size,) special_ids
        self.config = config
        ids = [special_ids.get(role) for role in SPECIAL_TOKENS]
        ids += [special_ids.get(text) for text in ADDITIONAL_TOKENS]
        end = tokenizer_facts[0] if len(tokenizer_facts) > 1 else None  # the vocabulary size, if given
        if None in ids or ids != list(range(ids[0], ids[0] + len(ids))) or end not in (None, ids[-1] + 1):
            raise ValueError("the tokenizer's T5 special tokens (<pad>, </s>, <extra_id_0..99>) are "
                             "not consecutive at the end of its vocabulary, where ringpipe's T5 "
                             "expects them")
        self.start_id = ids[0]
        self.data = SpanCorruption(ids[2:], ids[1])

    def batch(self, dataset, split: str, index: int):
        c = self.config
        inputs, targets = self.data.get_batch(dataset, split, index, c.batch_size,
                                              c.model.block_size, c.seed, c.sampler)
        return np.concatenate([inputs, shift_right(targets, self.start_id, self.start_id)],
                              axis=1), targets


FAMILY = Family(name="t5", options=T5Options, default_options=small_t5, config=t5_config,
                architecture_fields=ARCHITECTURE_FIELDS, model=T5, init_params=init_params,
                write_checkpoint_files=write_checkpoint_files, load_checkpoint=load_checkpoint,
                parallel_plan=T5ParallelPlan, objective=SpanCorruptionObjective,
                ignore_index=IGNORE_INDEX, special_tokens=SPECIAL_TOKENS,
                additional_tokens=ADDITIONAL_TOKENS, hf_config=hf_config, weights_metadata=weights_metadata,
                hf_tensors=hf_tensors)

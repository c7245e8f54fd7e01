"""T5's parallel plan (see model/parallel/plan.py): its names per pipeline stage, how each is sharded
under tensor parallelism, its tied shared embedding, and a stage's forward/backward.

    attn.qkv, cross.q, cross.kv   column-parallel by heads ([q | k | v] and [k | v] split per part)
    attn.o, cross.o, ff.wo        row-parallel, reduced by the output region
    ff.wi                         column-parallel ([gate | up] split per part when gated)
    relative_attention_bias       column-parallel: each rank its heads' columns of the table
    shared                        vocab-parallel rows: the embedding and the tied LM head, whose
                                  cross-entropy runs on the sharded logits
    norms                         replicated

Pipeline: the layers are numbered encoder first, then decoder (num_layers = both), so stages hold
encoder layers, then decoder layers; the first stage embeds, the last computes the loss. A T5 stage
passes one activation, the sequence-wise concatenation (B, Te + Td, C) of the encoder's hidden
states (its output once its last layer has run) and the decoder's: the first stage embeds the
packed [encoder ids | decoder ids] into it, encoder layers change the first Te positions, decoder
layers read them as the encoder output and change the last Td. So every decoder stage receives the
encoder output as its second activation, and the gradient it sends back carries the encoder
output's gradient, summed over every decoder layer that read it, in those Te positions.

A stack's relative position bias table sits with its first layer, and every layer of the stack
computes the bias from it, so a stack's layers must all be on one stage (`--encoder-stages 1` and
one decoder stage: pp 2); a split that divides a stack is refused by name.
"""
from __future__ import annotations

from ringpipe.model.parallel.plan import REPLICATED, Sharding, column_parallel, row_parallel, vocab_parallel
from ringpipe.model.t5.config import T5Config, decoder_layer_shapes, encoder_layer_shapes, init_params
from ringpipe.model.t5.layers import T5Layers


class T5ParallelPlan:
    """The plan of a T5 of `config` (see model/parallel/plan.py for the members)."""

    tied_params = ("shared.weight",)  # the LM head is the shared embedding

    def __init__(self, config: T5Config):
        self.config = config
        self.dtype, self.device = config.dtype, config.device
        self.num_layers = config.num_layers + config.num_decoder_layers

    def init_params(self, seed: int) -> dict:
        return init_params(self.config, seed)

    def embedding_params(self) -> list[str]:
        return ["shared.weight"]

    def block_params(self, i: int) -> list[str]:
        config, encoder_layers = self.config, self.config.num_layers
        if i < encoder_layers:
            names = list(encoder_layer_shapes(config, i))
            if i == 0:
                names.append("encoder.relative_attention_bias.weight")
            if i == encoder_layers - 1:
                names.append("encoder.final_norm.weight")
            return names
        names = list(decoder_layer_shapes(config, i - encoder_layers))
        return names + (["decoder.relative_attention_bias.weight"] if i == encoder_layers else [])

    def head_params(self) -> list[str]:
        return ["shared.weight", "decoder.final_norm.weight"]

    def sharding(self, name: str) -> Sharding:
        if name == "shared.weight":
            return vocab_parallel(0)
        if name.endswith("relative_attention_bias.weight"):
            return column_parallel(1)
        part = name.split(".", 2)[-1]
        return {"attn.qkv.weight": column_parallel(1, parts=3), "cross.q.weight": column_parallel(1),
                "cross.kv.weight": column_parallel(1, parts=2),
                "ff.wi.weight": column_parallel(1, parts=2 if self.config.gated else 1),
                "attn.o.weight": row_parallel(0), "cross.o.weight": row_parallel(0),
                "ff.wo.weight": row_parallel(0)}.get(part, REPLICATED)

    def check_tensor_parallel(self, size: int, rank: int, sequence_parallel: bool) -> None:
        config = self.config
        if sequence_parallel:
            raise ValueError("sequence parallel: not implemented for t5 (--sequence-parallel)")
        if config.num_heads % size:
            raise ValueError(f"tensor parallel: num_heads {config.num_heads} is not divisible by tp {size} "
                             f"(rank {rank})")
        if config.d_ff % size:
            raise ValueError(f"tensor parallel: d_ff {config.d_ff} is not divisible by tp {size} (rank {rank})")

    def stage_pieces(self, stage) -> "T5StagePieces":
        config, layers = self.config, stage.layers
        for stack, first, count in (("encoder", 0, config.num_layers),
                                    ("decoder", config.num_layers, config.num_decoder_layers)):
            held = [i for i in layers if first <= i < first + count]
            if held and len(held) != count:
                raise ValueError(f"t5 pipeline: a stage holds {len(held)} of the {count} {stack} layers; "
                                 f"each stack must be on one stage (its relative position bias is shared "
                                 f"by all its layers): use --encoder-stages 1 with --pp 2")
        return T5StagePieces(config, stage)


class _Deferred:
    """What a T5 block leaves for backward_weight: its gradients, already computed."""

    def __init__(self, layer: int, grads: dict):
        self.layer, self.grads = layer, grads


class T5StagePieces(T5Layers):
    """T5's embedding, layers and head for one `Stage`, on the packed (B, Te + Td, C) activation."""

    def __init__(self, config: T5Config, stage):
        self.config, self.stage = config, stage
        self.params, self.memory, self.tp, self.xp = stage.params, stage.memory, stage.tp, stage.xp
        self.input_region, self.output_region = stage.input_region, stage.output_region
        self.tensor_parallel = stage.tensor_parallel
        self.local_heads = config.num_heads // stage.tp_size
        self.vocab_rows = -(-config.vocab_size // stage.tp_size)
        self.vocab_start = stage.tp_rank * self.vocab_rows
        self.encoder_length = config.encoder_length

    def _split(self, x):
        return x[:, :self.encoder_length], x[:, self.encoder_length:]

    def _join(self, encoder, decoder):
        return self.xp.concatenate([encoder, decoder], axis=1)

    # ---- embedding: both halves of the packed ids, one vocab-parallel lookup ------------------
    def embedding_forward(self, idx, dropout_seed):
        x, lookup = self.embed_forward(idx)
        return x, self.memory.hold({"lookup": lookup})

    def embedding_backward(self, cache, dx) -> dict:
        self.memory.release(cache)
        return {"shared.weight": self.embed_backward(cache["lookup"], dx)}

    # ---- layers ---------------------------------------------------------------------------------
    def block_forward(self, i, x, dropout_seed):
        encoder, decoder = self._split(x)
        if i < self.config.num_layers:
            T = encoder.shape[1]
            bias, buckets = self.position_bias_forward("encoder", T, T)
            encoder, cache = self.encoder_layer_forward(i, encoder, None, bias)
            norm = None
            if i == self.config.num_layers - 1:  # the encoder's output
                encoder, norm = self.final_norm_forward("encoder", encoder)
            return self._join(encoder, decoder), {"layer": cache, "buckets": buckets, "norm": norm}
        T = decoder.shape[1]
        bias, buckets = self.position_bias_forward("decoder", T, T)
        decoder, cache = self.decoder_layer_forward(i - self.config.num_layers, decoder, encoder, None, bias)
        return self._join(encoder, decoder), {"layer": cache, "buckets": buckets}

    def block_backward_input(self, i, cache, dout):
        dencoder, ddecoder = self._split(dout)
        if i < self.config.num_layers:
            grads = {}
            if cache["norm"] is not None:
                dencoder, grads = self.final_norm_backward("encoder", cache["norm"], dencoder)
            dencoder, layer_grads, dbias = self.encoder_layer_backward(i, cache["layer"], dencoder)
            grads.update(layer_grads)
            grads.update(self.position_bias_backward("encoder", cache["buckets"], dbias))
            return self._join(dencoder, ddecoder), _Deferred(i, grads)
        ddecoder, grads, dbias, share = self.decoder_layer_backward(i - self.config.num_layers,
                                                                    cache["layer"], ddecoder)
        grads.update(self.position_bias_backward("decoder", cache["buckets"], dbias))
        # this layer's share of the encoder output's gradient, summed over tp, joins the others'
        dencoder = dencoder + self.input_region.backward(share, self.tp)
        return self._join(dencoder, ddecoder), _Deferred(i, grads)

    def block_backward_weight(self, deferred) -> dict:
        return deferred.grads

    # ---- head: the decoder half --------------------------------------------------------------------
    def head_forward(self, x, targets):
        return T5Layers.head_forward(self, self._split(x)[1], targets)

    def head_backward(self, cache, dloss):
        ddecoder, grads = T5Layers.head_backward(self, cache, dloss)
        B, _, C = ddecoder.shape
        return self._join(self.xp.zeros((B, self.encoder_length, C), ddecoder.dtype), ddecoder), grads

    def head_logits(self, x):
        return T5Layers.head_logits(self, self._split(x)[1])

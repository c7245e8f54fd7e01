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

The two relative position bias tables (transformers keeps each in its stack's first layer, and
every layer of the stack adds the bias computed from it) are held by the first stage and travel
with the activation: a few extra rows after the Te + Td positions hold this rank's heads' columns
of both tables, flattened, in batch row 0 (zeros in the others). Every layer, on whatever stage, computes its bias from
them and adds the table's gradient to those rows of the gradient it sends back, so the first stage
receives each table's gradient summed over every layer of its stack. Any split of the layers over
stages therefore works, a stack spread over several stages included.
"""
from __future__ import annotations

from ringpipe.model.nn import ops
from ringpipe.model.parallel.plan import REPLICATED, Sharding, column_parallel, row_parallel, vocab_parallel
from ringpipe.model.t5.config import T5Config, decoder_layer_shapes, encoder_layer_shapes, init_params
from ringpipe.model.t5.layers import T5Layers

TABLES = ("encoder.relative_attention_bias.weight", "decoder.relative_attention_bias.weight")


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
        return ["shared.weight", *TABLES]

    def block_params(self, i: int) -> list[str]:
        config, encoder_layers = self.config, self.config.num_layers
        if i < encoder_layers:
            names = list(encoder_layer_shapes(config, i))
            return names + (["encoder.final_norm.weight"] if i == encoder_layers - 1 else [])
        names = list(decoder_layer_shapes(config, i - encoder_layers))
        return names + (["decoder.final_norm.weight"] if i == self.num_layers - 1 else [])

    def head_params(self) -> list[str]:
        return ["shared.weight"]

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
        return T5StagePieces(self.config, stage)


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
        self.head_slice = slice(stage.tp_rank * self.local_heads, (stage.tp_rank + 1) * self.local_heads)
        columns = config.d_ff // stage.tp_size
        self.ff_columns = slice(stage.tp_rank * columns, (stage.tp_rank + 1) * columns)
        self.vocab_rows = -(-config.vocab_size // stage.tp_size)
        self.vocab_start = stage.tp_rank * self.vocab_rows
        self.encoder_length = config.encoder_length
        self.plan_layers = config.num_layers + config.num_decoder_layers

        self.table_shape = (config.relative_attention_num_buckets, self.local_heads)
        self.table_rows = -(-2 * self.table_shape[0] * self.table_shape[1] // config.d_model)

    # ---- the packed activation: encoder positions, decoder positions, the tables' rows ----------
    def _split(self, x):
        """x (B, Te + Td + table rows, C) -> encoder (B, Te, C), decoder (B, Td, C), and
        {stack: its table (num_buckets, local heads)} read from batch row 0 of the extra rows."""
        Te, rows = self.encoder_length, self.table_rows
        size = self.table_shape[0] * self.table_shape[1]
        flat = x[0, x.shape[1] - rows:].reshape(-1)
        tables = {"encoder": flat[:size].reshape(self.table_shape),
                  "decoder": flat[size:2 * size].reshape(self.table_shape)}
        return x[:, :Te], x[:, Te:x.shape[1] - rows], tables

    def _join(self, encoder, decoder, tables):
        """The inverse of _split: the tables' rows hold them in batch row 0, zeros elsewhere."""
        B, _, C = encoder.shape
        rows = self.xp.zeros((B, self.table_rows, C), encoder.dtype)
        flat = rows[0].reshape(-1)
        size = self.table_shape[0] * self.table_shape[1]
        flat[:size], flat[size:2 * size] = tables["encoder"].reshape(-1), tables["decoder"].reshape(-1)
        return self.xp.concatenate([encoder, decoder, rows], axis=1)

    def _bias(self, stack, tables, length):
        """The stack's position bias (1, local heads, T, T) from its travelling table."""
        return self.position_bias_forward(stack, length, length, table=tables[stack])

    def _zero_tables(self, dtype):
        return {stack: self.xp.zeros(self.table_shape, dtype) for stack in ("encoder", "decoder")}

    # ---- embedding: both halves of the packed ids, one vocab-parallel lookup; the tables join -----
    def embedding_forward(self, idx, dropout_seed):
        x, lookup = self.embed_forward(idx)
        Te = self.encoder_length
        encoder, encoder_mask = self.embed_dropout("encoder", x[:, :Te], dropout_seed)
        decoder, decoder_mask = self.embed_dropout("decoder", x[:, Te:], dropout_seed)
        tables = {stack: self.params[f"{stack}.relative_attention_bias.weight"]
                  for stack in ("encoder", "decoder")}
        return self._join(encoder, decoder, tables), self.memory.hold(
            {"lookup": lookup, "masks": (encoder_mask, decoder_mask)})

    def embedding_backward(self, cache, dx) -> dict:
        self.memory.release(cache)
        dencoder, ddecoder, dtables = self._split(dx)
        encoder_mask, decoder_mask = cache["masks"]
        dids = self.xp.concatenate([ops.dropout_backward(dencoder, encoder_mask),
                                    ops.dropout_backward(ddecoder, decoder_mask)], axis=1)
        return {"shared.weight": self.embed_backward(cache["lookup"], dids),
                **{f"{stack}.relative_attention_bias.weight": dtables[stack].copy()
                   for stack in ("encoder", "decoder")}}

    # ---- layers ---------------------------------------------------------------------------------
    def block_forward(self, i, x, dropout_seed):
        encoder, decoder, tables = self._split(x)
        if i < self.config.num_layers:
            bias, buckets = self._bias("encoder", tables, encoder.shape[1])
            encoder, cache = self.encoder_layer_forward(i, encoder, None, bias, dropout_seed)
            norm = None
            if i == self.config.num_layers - 1:  # the encoder's output
                encoder, norm = self.final_norm_forward("encoder", encoder, dropout_seed)
            return self._join(encoder, decoder, tables), self.memory.hold(
                {"layer": cache, "buckets": buckets, "norm": norm})
        bias, buckets = self._bias("decoder", tables, decoder.shape[1])
        decoder, cache = self.decoder_layer_forward(i - self.config.num_layers, decoder, encoder, None, bias,
                                                    dropout_seed)
        norm = None
        if i == self.plan_layers - 1:  # the decoder's output
            decoder, norm = self.final_norm_forward("decoder", decoder, dropout_seed)
        return self._join(encoder, decoder, tables), self.memory.hold(
            {"layer": cache, "buckets": buckets, "norm": norm})

    def block_backward_input(self, i, cache, dout):
        self.memory.release(cache)
        dencoder, ddecoder, dtables = self._split(dout)
        dtables = {stack: table.copy() for stack, table in dtables.items()}
        if i < self.config.num_layers:
            stack, grads = "encoder", {}
            if cache["norm"] is not None:
                dencoder, grads = self.final_norm_backward("encoder", cache["norm"], dencoder)
            dencoder, layer_grads, dbias = self.encoder_layer_backward(i, cache["layer"], dencoder)
            grads.update(layer_grads)
        else:
            stack, grads = "decoder", {}
            if cache["norm"] is not None:
                ddecoder, grads = self.final_norm_backward("decoder", cache["norm"], ddecoder)
            ddecoder, layer_grads, dbias, share = self.decoder_layer_backward(i - self.config.num_layers,
                                                                        cache["layer"], ddecoder)
            grads.update(layer_grads)
            # this layer's share of the encoder output's gradient, summed over tp, joins the others'
            dencoder = dencoder + self.input_region.backward(share, self.tp)
        name = f"{stack}.relative_attention_bias.weight"
        dtables[stack] += self.position_bias_backward(stack, cache["buckets"], dbias)[name]
        return self._join(dencoder, ddecoder, dtables), _Deferred(i, grads)

    def block_backward_weight(self, deferred) -> dict:
        return deferred.grads

    # ---- head: the decoder half --------------------------------------------------------------------
    def head_forward(self, x, targets):
        return T5Layers.head_forward(self, self._split(x)[1], targets)

    def head_backward(self, cache, dloss):
        ddecoder, grads = T5Layers.head_backward(self, cache, dloss)
        B, _, C = ddecoder.shape
        zeros = self.xp.zeros((B, self.encoder_length, C), ddecoder.dtype)
        return self._join(zeros, ddecoder, self._zero_tables(ddecoder.dtype)), grads

    def head_logits(self, x):
        return T5Layers.head_logits(self, self._split(x)[1])

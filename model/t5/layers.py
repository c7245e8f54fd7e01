"""T5's sublayers as op pairs, written once for the dense model and the tensor-parallel stage.

Every sublayer is pre-norm and residual, with no biases and unscaled attention scores (T5):

    entry:  RMS norm → input region → column-parallel linear
            local op: self-attention (position bias, padding mask, causal in the decoder),
                      cross-attention over the encoder output, or ReLU / gated-GELU
    exit:   row-parallel linear → output region → dropout → + sublayer input

The regions are identities in the dense model and tensor parallelism's copy/reduce regions in a
stage (model/parallel/tensor_parallel/tensor_parallel_communications.py), as for GPT-2's block.
Cross-attention's backward returns this layer's share of the encoder output's gradient before the
input region: the caller sums the shares of every decoder layer and crosses the region (the sum
over tensor-parallel ranks), once or per layer.

The relative position bias is computed once per stack from its table (transformers keeps the table
in block 0) and shared by every layer of the stack; each layer's gradient of it is summed before
the table's backward. Under tensor parallelism a rank holds its heads' columns of the table.
"""
from __future__ import annotations

from ringpipe.model.gpt2.block import dropout_generator_seed
from ringpipe.model.nn import ops
from ringpipe.model.nn.attention_ops import (cross_attention_backward, cross_attention_forward,
                                             relative_position_bias_backward,
                                             relative_position_bias_forward,
                                             relative_position_buckets, self_attention_backward,
                                             self_attention_forward)
from ringpipe.model.nn.encoder_decoder_ops import (gated_gelu_backward, gated_gelu_forward,
                                                   relu_backward, relu_forward, rms_norm_backward,
                                                   rms_norm_forward)
from ringpipe.model.parallel.tensor_parallel.layers import (SliceOfFullDraw,
                                                            vocab_parallel_cross_entropy_backward,
                                                            vocab_parallel_cross_entropy_forward,
                                                            vocab_parallel_embedding_backward,
                                                            vocab_parallel_embedding_forward)

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)

# Dropout sites, where transformers' T5 drops: a mask is drawn from (dropout_seed, layer, site), so
# every layout draws the same. Layers: the encoder's i, the decoder's DECODER_LAYERS + i; the
# embedding and final-norm sites are the stack's STACK_LAYER.
EMBEDDING, ATTENTION_PROBS, ATTENTION_OUT, CROSS_PROBS, CROSS_OUT, FF_HIDDEN, FF_OUT, FINAL = range(8)
DECODER_LAYERS = 1 << 16
STACK_LAYER = {"encoder": -1, "decoder": DECODER_LAYERS - 1}


def _layer_id(name: str) -> int:
    """'encoder.3.…' -> 3, 'decoder.3.…' -> DECODER_LAYERS + 3."""
    stack, index = name.split(".")[:2]
    return int(index) + (DECODER_LAYERS if stack == "decoder" else 0)


class T5Layers:
    """Embedding, encoder and decoder layers, position biases and the LM head of a T5.

    Layer caches are returned unheld: the caller holds them in its ActivationMemory (`memory`, which
    the head uses) as it keeps them. Mixed into a class that provides
        config              T5Config
        params              ringpipe T5 names (model/t5/config.py) -> arrays (this rank's shards)
        xp                  the array module
        local_heads         attention heads computed here (num_heads / tensor-parallel size)
        input_region, output_region, tp
                            the regions around the column- and row-parallel linears and their
                            communicator (identities and None in the dense model)
        tensor_parallel     whether the vocabulary is split (vocab_start, vocab_rows then given)
        head_slice, ff_columns
                            this rank's heads of num_heads and columns of d_ff (slices)
    """

    # ---- dropout: masks drawn from (dropout_seed, layer, site) for the full tensor ------------
    def _rng(self, dropout_seed, layer, site, full_shape=None, index=None):
        """The generator of one mask, or None without dropout. Under tensor parallelism a rank's
        share of a split tensor (`index` into `full_shape`) is sliced from the full draw, so the
        masks, and training, are the dense model's whatever the layout."""
        if not self.config.dropout_rate or dropout_seed is None:
            return None
        rng = self.xp.random.default_rng(dropout_generator_seed(dropout_seed, layer, site))
        return SliceOfFullDraw(rng, full_shape, index) if self.tensor_parallel and index else rng

    def _rate(self, rng):
        return self.config.dropout_rate if rng is not None else 0.0

    def _dropout(self, x, dropout_seed, layer, site):
        """Dropout of a tensor every rank holds whole -> (out, keep mask or None)."""
        rng = self._rng(dropout_seed, layer, site)
        return ops.dropout_forward(x, self._rate(rng), rng)

    def _probs_rng(self, dropout_seed, layer, site, batch_queries_keys):
        """The attention probabilities' generator: this rank's heads of (B, H, Tq, Tk)."""
        B, Tq, Tk = batch_queries_keys
        return self._rng(dropout_seed, layer, site, (B, self.config.num_heads, Tq, Tk),
                         (slice(None), self.head_slice))

    # ---- one sublayer's entry and exit -------------------------------------------------------
    def _entry(self, x, norm, column):
        """RMS norm → input region → linear: -> (out, norm cache, the linear's input)."""
        a, norm_cache = rms_norm_forward(x, self.params[norm], self.config.layer_norm_epsilon)
        a = self.input_region.forward(a, self.tp)
        return ops.linear_forward(a, self.params[column])[0], norm_cache, a

    def _entry_backward(self, cache, dout_column, dout_sublayer, norm, column, grads):
        grads[column] = ops.linear_backward_weight(dout_column, cache["a"], has_bias=False)[0]
        da = self.input_region.backward(ops.linear_backward_input(dout_column, self.params[column]),
                                        self.tp)
        dx, grads[norm] = rms_norm_backward(da, cache["norm"], self.params[norm])
        dx += dout_sublayer  # residual
        return dx

    def _exit(self, x, y, row, dropout_seed, site):
        """Row-parallel linear → output region → dropout → + x: -> (out, dropout mask)."""
        out = self.output_region.forward(ops.linear_forward(y, self.params[row])[0], self.tp)
        out, keep_mask = self._dropout(out, dropout_seed, _layer_id(row), site)
        out += x
        return out, keep_mask

    def _exit_backward(self, cache, dout, row, grads):
        dy = self.output_region.backward(ops.dropout_backward(dout, cache["out_mask"]), self.tp)
        grads[row] = ops.linear_backward_weight(dy, cache["y"], has_bias=False)[0]
        return ops.linear_backward_input(dy, self.params[row])

    # ---- self-attention (encoder: bidirectional; decoder: causal) ----------------------------
    def self_attention_sublayer(self, h, x, key_mask, position_bias, causal, dropout_seed=None):
        qkv, norm, a = self._entry(x, h + "attn_norm.weight", h + "attn.qkv.weight")
        B, T = qkv.shape[:2]
        rng = self._probs_rng(dropout_seed, _layer_id(h), ATTENTION_PROBS, (B, T, T))
        y, attn = self_attention_forward(qkv, self.local_heads, key_mask, position_bias, causal,
                                         scale=1.0, dropout_p=self._rate(rng), rng=rng)
        out, out_mask = self._exit(x, y, h + "attn.o.weight", dropout_seed, ATTENTION_OUT)
        return out, {"norm": norm, "a": a, "attn": attn, "y": y, "out_mask": out_mask}

    def self_attention_sublayer_backward(self, h, cache, dout, grads):
        """-> (dx, the gradient of the position bias this layer added)."""
        dy = self._exit_backward(cache, dout, h + "attn.o.weight", grads)
        dqkv, dbias = self_attention_backward(dy, cache["attn"], self.local_heads, scale=1.0)
        return self._entry_backward(cache, dqkv, dout, h + "attn_norm.weight",
                                    h + "attn.qkv.weight", grads), dbias

    # ---- cross-attention ---------------------------------------------------------------------
    def cross_attention_sublayer(self, h, x, encoder_out, encoder_mask, dropout_seed=None):
        q, norm, a = self._entry(x, h + "cross_norm.weight", h + "cross.q.weight")
        encoder_out = self.input_region.forward(encoder_out, self.tp)
        rng = self._probs_rng(dropout_seed, _layer_id(h), CROSS_PROBS,
                              (q.shape[0], q.shape[1], encoder_out.shape[1]))
        y, cross = cross_attention_forward(q, encoder_out, self.params[h + "cross.kv.weight"], None,
                                           self.local_heads, encoder_mask, scale=1.0,
                                           dropout_p=self._rate(rng), rng=rng)
        out, out_mask = self._exit(x, y, h + "cross.o.weight", dropout_seed, CROSS_OUT)
        return out, {"norm": norm, "a": a, "cross": cross, "y": y, "out_mask": out_mask}

    def cross_attention_sublayer_backward(self, h, cache, dout, grads):
        """-> (dx, this layer's share of the encoder output's gradient, before the input region)."""
        dy = self._exit_backward(cache, dout, h + "cross.o.weight", grads)
        dq, dencoder_out, grads[h + "cross.kv.weight"], _, _ = cross_attention_backward(
            dy, cache["cross"], self.params[h + "cross.kv.weight"], self.local_heads,
            has_kv_bias=False, scale=1.0)
        return self._entry_backward(cache, dq, dout, h + "cross_norm.weight", h + "cross.q.weight",
                                    grads), dencoder_out

    # ---- feed-forward ------------------------------------------------------------------------
    def feed_forward_sublayer(self, h, x, dropout_seed=None):
        f, norm, a = self._entry(x, h + "ff_norm.weight", h + "ff.wi.weight")
        if self.config.gated:
            width = f.shape[-1] // 2  # [gate | up], each split by tensor parallelism
            y, act = gated_gelu_forward(f[..., :width], f[..., width:])
        else:
            y, act = relu_forward(f)
        # dropout on the hidden activation: this rank's columns of the full (B, T, d_ff) mask
        rng = self._rng(dropout_seed, _layer_id(h), FF_HIDDEN, (*y.shape[:2], self.config.d_ff),
                        (slice(None), slice(None), self.ff_columns))
        y, hidden_mask = ops.dropout_forward(y, self._rate(rng), rng)
        out, out_mask = self._exit(x, y, h + "ff.wo.weight", dropout_seed, FF_OUT)
        return out, {"norm": norm, "a": a, "act": act, "y": y, "hidden_mask": hidden_mask,
                     "out_mask": out_mask}

    def feed_forward_sublayer_backward(self, h, cache, dout, grads):
        dy = ops.dropout_backward(self._exit_backward(cache, dout, h + "ff.wo.weight", grads),
                                  cache["hidden_mask"])
        if self.config.gated:
            df = self.xp.concatenate(gated_gelu_backward(dy, cache["act"]), axis=-1)
        else:
            df = relu_backward(dy, cache["act"])
        return self._entry_backward(cache, df, dout, h + "ff_norm.weight", h + "ff.wi.weight", grads)

    # ---- layers ------------------------------------------------------------------------------
    def encoder_layer_forward(self, i, x, key_mask, position_bias, dropout_seed=None):
        """x (B, T, C) -> (B, T, C), cache."""
        h = f"encoder.{i}."
        x, attn = self.self_attention_sublayer(h, x, key_mask, position_bias, False, dropout_seed)
        x, ff = self.feed_forward_sublayer(h, x, dropout_seed)
        return x, {"attn": attn, "ff": ff}

    def encoder_layer_backward(self, i, cache, dout):
        """-> (dx, grads of the layer, dposition_bias)."""
        h, grads = f"encoder.{i}.", {}
        dx = self.feed_forward_sublayer_backward(h, cache["ff"], dout, grads)
        dx, dbias = self.self_attention_sublayer_backward(h, cache["attn"], dx, grads)
        return dx, grads, dbias

    def decoder_layer_forward(self, i, y, encoder_out, encoder_mask, position_bias,
                              dropout_seed=None):
        """y (B, Td, C), encoder_out (B, Te, C) -> (B, Td, C), cache."""
        h = f"decoder.{i}."
        y, attn = self.self_attention_sublayer(h, y, None, position_bias, True, dropout_seed)
        y, cross = self.cross_attention_sublayer(h, y, encoder_out, encoder_mask, dropout_seed)
        y, ff = self.feed_forward_sublayer(h, y, dropout_seed)
        return y, {"attn": attn, "cross": cross, "ff": ff}

    def decoder_layer_backward(self, i, cache, dout):
        """-> (dy, grads of the layer, dposition_bias, this layer's share of dencoder_out)."""
        h, grads = f"decoder.{i}.", {}
        dy = self.feed_forward_sublayer_backward(h, cache["ff"], dout, grads)
        dy, dencoder_out = self.cross_attention_sublayer_backward(h, cache["cross"], dy, grads)
        dy, dbias = self.self_attention_sublayer_backward(h, cache["attn"], dy, grads)
        return dy, grads, dbias, dencoder_out

    # ---- position bias -----------------------------------------------------------------------
    def position_bias_forward(self, stack, query_length, key_length, query_offset=0, table=None):
        """stack "encoder" (bidirectional) or "decoder" -> (bias (1, H, Tq, Tk), buckets), from
        `table` or else the stack's parameter."""
        config = self.config
        buckets = relative_position_buckets(query_length, key_length, stack == "encoder",
                                            config.relative_attention_num_buckets,
                                            config.relative_attention_max_distance, query_offset,
                                            self.xp)
        if table is None:
            table = self.params[f"{stack}.relative_attention_bias.weight"]
        return relative_position_bias_forward(table, buckets)[0], buckets

    def position_bias_backward(self, stack, buckets, dbias) -> dict:
        """dbias summed over the stack's layers -> {the table's name: its gradient}."""
        return {f"{stack}.relative_attention_bias.weight": relative_position_bias_backward(
            dbias, buckets, self.config.relative_attention_num_buckets)}

    # ---- shared embedding, vocab-parallel under tensor parallelism ---------------------------
    def embed_forward(self, ids):
        """ids int (B, T) -> (x (B, T, C), lookup cache)."""
        if self.tensor_parallel:
            x, lookup = vocab_parallel_embedding_forward(self.params["shared.weight"], ids,
                                                         self.vocab_start)
            return self.output_region.forward(x, self.tp), lookup
        if ids.shape[1] and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise IndexError(f"token id outside the vocabulary of {self.config.vocab_size}")
        return ops.embedding_forward(self.params["shared.weight"], ids)

    def embed_dropout(self, stack, x, dropout_seed):
        """Dropout of a stack's embedded input (transformers' T5 drops it) -> (x, keep mask)."""
        return self._dropout(x, dropout_seed, STACK_LAYER[stack], EMBEDDING)

    def embed_backward(self, lookup, dx):
        """-> the shared embedding's gradient (this rank's rows)."""
        if self.tensor_parallel:
            return vocab_parallel_embedding_backward(self.output_region.backward(dx, self.tp),
                                                     lookup, self.vocab_rows)
        return ops.embedding_backward(dx, lookup, self.config.vocab_size)

    # ---- final norms and the LM head ---------------------------------------------------------
    def final_norm_forward(self, stack, x, dropout_seed=None):
        """The stack's final norm, then dropout -> (out, cache)."""
        out, norm = rms_norm_forward(x, self.params[f"{stack}.final_norm.weight"],
                                     self.config.layer_norm_epsilon)
        out, keep_mask = self._dropout(out, dropout_seed, STACK_LAYER[stack], FINAL)
        return out, (norm, keep_mask)

    def final_norm_backward(self, stack, cache, dx):
        """-> (dx, {the norm's name: its gradient})."""
        name = f"{stack}.final_norm.weight"
        norm, keep_mask = cache
        dx, dweight = rms_norm_backward(ops.dropout_backward(dx, keep_mask), norm, self.params[name])
        return dx, {name: dweight}

    def _head_input(self, h):
        """The decoder's output (after its final norm) × d_model^-0.5 when scaled, into the region."""
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5
        return self.input_region.forward(h, self.tp)

    def head_forward(self, h, labels):
        """h (B, T, C) the decoder's output, labels int (B, T) (IGNORE_INDEX skipped) ->
        (mean loss float, cache)."""
        a = self._head_input(h)
        logits = ops.linear_forward(a, self.params["shared.weight"].T)[0]  # (B, T, V or V/tp)
        if self.tensor_parallel:
            loss, ce = vocab_parallel_cross_entropy_forward(logits, labels, self.vocab_start,
                                                            self.config.vocab_size, self.tp,
                                                            IGNORE_INDEX)
        else:
            loss, ce = ops.cross_entropy_forward(logits, labels, IGNORE_INDEX,
                                                 overwrite_logits=True)
        return loss, self.memory.hold({"a": a, "ce": ce})

    def head_backward(self, cache, dloss=1.0):
        """-> (dh (B, T, C), {shared.weight: the LM head's share})."""
        self.memory.release(cache)
        backward = (vocab_parallel_cross_entropy_backward if self.tensor_parallel
                    else ops.cross_entropy_backward)
        a, shared = cache["a"], self.params["shared.weight"]
        dlogits = backward(cache["ce"], dloss).astype(a.dtype, copy=False)
        dshared = ops.matmul(dlogits.reshape(-1, dlogits.shape[-1]).T, a.reshape(-1, a.shape[-1]))
        dh = self.input_region.backward(ops.linear_backward_input(dlogits, shared.T), self.tp)
        if self.config.scale_decoder_outputs:
            dh *= self.config.d_model ** -0.5
        return dh, {"shared.weight": dshared}

    def head_logits(self, h):
        """h (B, T, C) the decoder's output -> logits (B, T, vocab_size), gathered over
        tensor-parallel ranks."""
        a = self._head_input(h)
        local = ops.linear_forward(a, self.params["shared.weight"].T)[0]
        if not self.tensor_parallel:
            return local
        gathered = self.tp.all_gather(self.xp.ascontiguousarray(local.transpose(2, 0, 1)))
        return gathered.transpose(1, 2, 0)[..., :self.config.vocab_size]

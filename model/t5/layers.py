"""T5's sublayers as op pairs, written once for the dense model and the tensor-parallel stage.

Every sublayer is pre-norm and residual, with no biases and unscaled attention scores (T5):

    entry:  RMS norm → input region → column-parallel linear
            local op: self-attention (position bias, padding mask, causal in the decoder),
                      cross-attention over the encoder output, or ReLU / gated-GELU
    exit:   row-parallel linear → output region → + sublayer input

The regions are identities in the dense model and tensor parallelism's copy/reduce regions in a
stage (model/parallel/tensor_parallel/tensor_parallel_communications.py), as for GPT-2's block.
Cross-attention's backward returns this layer's share of the encoder output's gradient before the
input region: the caller sums the shares of every decoder layer and crosses the region once.

The relative position bias is computed once per stack from its table (transformers keeps the table
in block 0) and shared by every layer of the stack; each layer's gradient of it is summed before
the table's backward. Under tensor parallelism a rank holds its heads' columns of the table.
"""
from __future__ import annotations

from ringpipe.model.nn import ops
from ringpipe.model.nn.attention_ops import (cross_attention_backward, cross_attention_forward,
                                             relative_position_bias_backward,
                                             relative_position_bias_forward,
                                             relative_position_buckets, self_attention_backward,
                                             self_attention_forward)
from ringpipe.model.nn.encoder_decoder_ops import (gated_gelu_backward, gated_gelu_forward,
                                                   relu_backward, relu_forward, rms_norm_backward,
                                                   rms_norm_forward)
from ringpipe.model.parallel.tensor_parallel.layers import (vocab_parallel_cross_entropy_backward,
                                                            vocab_parallel_cross_entropy_forward,
                                                            vocab_parallel_embedding_backward,
                                                            vocab_parallel_embedding_forward)

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


class T5Layers:
    """Embedding, encoder and decoder layers, position biases and the LM head of a T5.

    Mixed into a class that provides
        config              T5Config
        params              ringpipe T5 names (model/t5/config.py) -> arrays (this rank's shards)
        xp                  the array module
        local_heads         attention heads computed here (num_heads / tensor-parallel size)
        input_region, output_region, tp
                            the regions around the column- and row-parallel linears and their
                            communicator (identities and None in the dense model)
        tensor_parallel     whether the vocabulary is split (vocab_start, vocab_rows then given)
    """

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

    def _exit(self, x, y, row):
        """Row-parallel linear → output region → + x."""
        out = self.output_region.forward(ops.linear_forward(y, self.params[row])[0], self.tp)
        out += x
        return out

    def _exit_backward(self, cache, dout, row, grads):
        dy = self.output_region.backward(dout, self.tp)
        grads[row] = ops.linear_backward_weight(dy, cache["y"], has_bias=False)[0]
        return ops.linear_backward_input(dy, self.params[row])

    # ---- self-attention (encoder: bidirectional; decoder: causal) ----------------------------
    def self_attention_sublayer(self, h, x, key_mask, position_bias, causal):
        qkv, norm, a = self._entry(x, h + "attn_norm.weight", h + "attn.qkv.weight")
        y, attn = self_attention_forward(qkv, self.local_heads, key_mask, position_bias, causal,
                                         scale=1.0)
        return self._exit(x, y, h + "attn.o.weight"), {"norm": norm, "a": a, "attn": attn, "y": y}

    def self_attention_sublayer_backward(self, h, cache, dout, grads):
        """-> (dx, the gradient of the position bias this layer added)."""
        dy = self._exit_backward(cache, dout, h + "attn.o.weight", grads)
        dqkv, dbias = self_attention_backward(dy, cache["attn"], self.local_heads, scale=1.0)
        return self._entry_backward(cache, dqkv, dout, h + "attn_norm.weight",
                                    h + "attn.qkv.weight", grads), dbias

    # ---- cross-attention ---------------------------------------------------------------------
    def cross_attention_sublayer(self, h, x, encoder_out, encoder_mask):
        q, norm, a = self._entry(x, h + "cross_norm.weight", h + "cross.q.weight")
        encoder_out = self.input_region.forward(encoder_out, self.tp)
        y, cross = cross_attention_forward(q, encoder_out, self.params[h + "cross.kv.weight"], None,
                                           self.local_heads, encoder_mask, scale=1.0)
        return self._exit(x, y, h + "cross.o.weight"), {"norm": norm, "a": a, "cross": cross,
                                                        "y": y}

    def cross_attention_sublayer_backward(self, h, cache, dout, grads):
        """-> (dx, this layer's share of the encoder output's gradient, before the input region)."""
        dy = self._exit_backward(cache, dout, h + "cross.o.weight", grads)
        dq, dencoder_out, grads[h + "cross.kv.weight"], _, _ = cross_attention_backward(
            dy, cache["cross"], self.params[h + "cross.kv.weight"], self.local_heads,
            has_kv_bias=False, scale=1.0)
        return self._entry_backward(cache, dq, dout, h + "cross_norm.weight", h + "cross.q.weight",
                                    grads), dencoder_out

    # ---- feed-forward ------------------------------------------------------------------------
    def feed_forward_sublayer(self, h, x):
        f, norm, a = self._entry(x, h + "ff_norm.weight", h + "ff.wi.weight")
        if self.config.gated:
            width = f.shape[-1] // 2  # [gate | up], each split by tensor parallelism
            y, act = gated_gelu_forward(f[..., :width], f[..., width:])
        else:
            y, act = relu_forward(f)
        return self._exit(x, y, h + "ff.wo.weight"), {"norm": norm, "a": a, "act": act, "y": y}

    def feed_forward_sublayer_backward(self, h, cache, dout, grads):
        dy = self._exit_backward(cache, dout, h + "ff.wo.weight", grads)
        if self.config.gated:
            df = self.xp.concatenate(gated_gelu_backward(dy, cache["act"]), axis=-1)
        else:
            df = relu_backward(dy, cache["act"])
        return self._entry_backward(cache, df, dout, h + "ff_norm.weight", h + "ff.wi.weight", grads)

    # ---- layers ------------------------------------------------------------------------------
    def encoder_layer_forward(self, i, x, key_mask, position_bias):
        """x (B, T, C) -> (B, T, C), cache."""
        h = f"encoder.{i}."
        x, attn = self.self_attention_sublayer(h, x, key_mask, position_bias, causal=False)
        x, ff = self.feed_forward_sublayer(h, x)
        return x, self.memory.hold({"attn": attn, "ff": ff})

    def encoder_layer_backward(self, i, cache, dout):
        """-> (dx, grads of the layer, dposition_bias)."""
        self.memory.release(cache)
        h, grads = f"encoder.{i}.", {}
        dx = self.feed_forward_sublayer_backward(h, cache["ff"], dout, grads)
        dx, dbias = self.self_attention_sublayer_backward(h, cache["attn"], dx, grads)
        return dx, grads, dbias

    def decoder_layer_forward(self, i, y, encoder_out, encoder_mask, position_bias):
        """y (B, Td, C), encoder_out (B, Te, C) -> (B, Td, C), cache."""
        h = f"decoder.{i}."
        y, attn = self.self_attention_sublayer(h, y, None, position_bias, causal=True)
        y, cross = self.cross_attention_sublayer(h, y, encoder_out, encoder_mask)
        y, ff = self.feed_forward_sublayer(h, y)
        return y, self.memory.hold({"attn": attn, "cross": cross, "ff": ff})

    def decoder_layer_backward(self, i, cache, dout):
        """-> (dy, grads of the layer, dposition_bias, this layer's share of dencoder_out)."""
        self.memory.release(cache)
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

    def embed_backward(self, lookup, dx):
        """-> the shared embedding's gradient (this rank's rows)."""
        if self.tensor_parallel:
            return vocab_parallel_embedding_backward(self.output_region.backward(dx, self.tp),
                                                     lookup, self.vocab_rows)
        return ops.embedding_backward(dx, lookup, self.config.vocab_size)

    # ---- final norms and the LM head ---------------------------------------------------------
    def final_norm_forward(self, stack, x):
        return rms_norm_forward(x, self.params[f"{stack}.final_norm.weight"],
                                self.config.layer_norm_epsilon)

    def final_norm_backward(self, stack, cache, dx):
        """-> (dx, {the norm's name: its gradient})."""
        name = f"{stack}.final_norm.weight"
        dx, dweight = rms_norm_backward(dx, cache, self.params[name])
        return dx, {name: dweight}

    def _head_input(self, x):
        a, norm = self.final_norm_forward("decoder", x)
        if self.config.scale_decoder_outputs:
            a = a * self.config.d_model ** -0.5
        return self.input_region.forward(a, self.tp), norm

    def head_forward(self, x, labels):
        """x (B, T, C), labels int (B, T) (IGNORE_INDEX skipped) -> (mean loss float, cache)."""
        a, norm = self._head_input(x)
        logits = ops.linear_forward(a, self.params["shared.weight"].T)[0]  # (B, T, V or V/tp)
        if self.tensor_parallel:
            loss, ce = vocab_parallel_cross_entropy_forward(logits, labels, self.vocab_start,
                                                            self.config.vocab_size, self.tp,
                                                            IGNORE_INDEX)
        else:
            loss, ce = ops.cross_entropy_forward(logits, labels, IGNORE_INDEX,
                                                 overwrite_logits=True)
        return loss, self.memory.hold({"norm": norm, "a": a, "ce": ce})

    def head_backward(self, cache, dloss=1.0):
        """-> (dx (B, T, C), {shared.weight (the LM head's share), decoder.final_norm.weight})."""
        self.memory.release(cache)
        backward = (vocab_parallel_cross_entropy_backward if self.tensor_parallel
                    else ops.cross_entropy_backward)
        a, shared = cache["a"], self.params["shared.weight"]
        dlogits = backward(cache["ce"], dloss).astype(a.dtype, copy=False)
        dshared = ops.matmul(dlogits.reshape(-1, dlogits.shape[-1]).T, a.reshape(-1, a.shape[-1]))
        da = self.input_region.backward(ops.linear_backward_input(dlogits, shared.T), self.tp)
        if self.config.scale_decoder_outputs:
            da *= self.config.d_model ** -0.5
        dx, grads = self.final_norm_backward("decoder", cache["norm"], da)
        grads["shared.weight"] = dshared
        return dx, grads

    def head_logits(self, x):
        """x (B, T, C) -> logits (B, T, vocab_size), gathered over tensor-parallel ranks."""
        a, _ = self._head_input(x)
        local = ops.linear_forward(a, self.params["shared.weight"].T)[0]
        if not self.tensor_parallel:
            return local
        gathered = self.tp.all_gather(self.xp.ascontiguousarray(local.transpose(2, 0, 1)))
        return gathered.transpose(1, 2, 0)[..., :self.config.vocab_size]

"""BERT's embedding, post-LN encoder layers and masked-LM head as op pairs, written once for the dense
model (model/bert/model.py) and for a parallel stage (model/bert/parallel_plan.py).

    embedding   LayerNorm(word[ids] + position[0..T) + token_type[types]) → dropout
    layer i     h = LayerNorm(x + dropout(out(attn(qkv(x)))))             attention, post-LN
                y = LayerNorm(h + dropout(out2(gelu_erf(inter(h)))))      MLP, post-LN
    MLM head    logits = LayerNorm(gelu_erf(x W + b)) · word_embeddingsᵀ + bias   (tied decoder)
    NSP head    (optional) logits2 = tanh(x[:, 0] W_pool + b_pool) W_nsp + b_nsp on the [CLS] row;
                its label rides in targets[:, 0] ([CLS] is never a masked-LM target), and the loss
                is the masked-LM mean plus the next-sentence mean, as BertForPreTraining's

A sublayer is input region → column-parallel linear (qkv by heads, intermediate) → local op →
row-parallel linear → output region → + bias → dropout → + residual → LayerNorm, the regions being
identities in the dense model and tensor_parallel_communications.py's in a tensor-parallel stage
(with sequence parallelism the LayerNorms, dropout and residuals run on sequence shards). The word
embeddings, the tied decoder and the decoder bias are vocab-parallel; the loss is then the
vocab-parallel cross-entropy over the chosen positions (targets -100 elsewhere).

The pieces take their host (`stage`): params, memory, tp, xp, input_region, output_region,
tensor_parallel, sequence_parallel, tp_size, tp_rank and positions(length), as a model/parallel
Stage has them. Dropout masks are drawn for the full tensor from (dropout_seed, layer, site) and
sliced, so every layout drops the same elements.
"""
from __future__ import annotations

from types import SimpleNamespace

from ringpipe.model.bert.config import WORD_EMBEDDINGS, layer_prefix
from ringpipe.model.gpt2.parallel_plan import StageBinding
from ringpipe.model.nn import attention_ops, ops
from ringpipe.model.nn import encoder_decoder_ops as edo
from ringpipe.model.parallel.tensor_parallel.tensor_parallel_communications import all_gather_sequence
from ringpipe.model.parallel.tensor_parallel.layers import (vocab_parallel_cross_entropy_backward,
                                                            vocab_parallel_cross_entropy_forward,
                                                            vocab_parallel_embedding_backward,
                                                            vocab_parallel_embedding_forward)

# Dropout sites (see dropout_generator_seed); the embedding is layer -1.
EMBEDDING, ATTN_PROBS, ATTN_RESIDUAL, MLP_RESIDUAL = range(4)
IGNORE_INDEX = edo.MLM_IGNORE_INDEX
E = "embeddings."
HEAD = "cls.predictions."


class BertPieces(StageBinding):
    """BERT's embedding, layers and MLM head on one host (a Stage, or the dense model)."""

    # ---- embedding ---------------------------------------------------------------------------------
    def embedding_forward(self, idx, dropout_seed=None):
        """idx int (B, T) token ids (all of type 0), or (B, 2, T) token ids and token types (sentence
        pairs) -> x (B, T, C) (B, T/tp, C with sequence parallelism); ValueError when T exceeds
        the position table."""
        idx, types = (idx[:, 0], idx[:, 1]) if idx.ndim == 3 else (idx, None)
        p, T = self.params, idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than BERT's position table "
                             f"({self.config.block_size} positions, --block-size)")
        if self.stage.tensor_parallel:
            tok, lookup = vocab_parallel_embedding_forward(p[WORD_EMBEDDINGS], idx, self.vocab_start)
            tok = self.output_region.forward(tok, self.tp)
        else:
            tok, lookup = ops.embedding_forward(p[WORD_EMBEDDINGS], idx)
        positions = self.stage.positions(T)
        summed = tok + p[E + "position_embeddings.weight"][positions]
        if types is None:
            summed += p[E + "token_type_embeddings.weight"][0]  # one segment: every token is of type 0
        else:
            types = types[:, positions]
            summed += p[E + "token_type_embeddings.weight"][types]
        x, norm = ops.layernorm_forward(summed, p[E + "LayerNorm.weight"], p[E + "LayerNorm.bias"],
                                        self.config.layer_norm_epsilon)
        x, keep_mask = self._dropout(x, dropout_seed, -1, EMBEDDING)
        return x, self.memory.hold({"lookup": lookup, "types": types, "norm": norm, "dropout": keep_mask,
                                    "length": T})

    def embedding_backward(self, cache, dx) -> dict:
        self.memory.release(cache)
        p = self.params
        dx = ops.dropout_backward(dx, cache["dropout"])
        dsummed, dln_w, dln_b = ops.layernorm_backward(dx, cache["norm"], p[E + "LayerNorm.weight"])
        dposition = self.xp.zeros_like(p[E + "position_embeddings.weight"])
        dposition[self.stage.positions(cache["length"])] = dsummed.sum(0)
        if cache["types"] is None:
            dtype = self.xp.zeros_like(p[E + "token_type_embeddings.weight"])
            dtype[0] = dsummed.sum((0, 1))
        else:
            dtype = ops.embedding_backward(dsummed, cache["types"], self.config.type_vocab_size)
        if self.stage.tensor_parallel:
            dword = vocab_parallel_embedding_backward(self.output_region.backward(dsummed, self.tp),
                                                      cache["lookup"], self.vocab_rows)
        else:
            dword = ops.embedding_backward(dsummed, cache["lookup"], self.config.vocab_size)
        return {WORD_EMBEDDINGS: dword, E + "position_embeddings.weight": dposition,
                E + "token_type_embeddings.weight": dtype, E + "LayerNorm.weight": dln_w, E + "LayerNorm.bias": dln_b}

    # ---- encoder layer i ---------------------------------------------------------------------------
    def _sublayer_exit(self, i, x, y, row, norm, dropout_seed, site):
        """Row-parallel linear → output region → + bias → dropout → + x → LayerNorm."""
        p, h = self.params, layer_prefix(i)
        y, row_input = ops.linear_forward(y, p[h + row + ".weight"])
        y = self.output_region.forward(y, self.tp)
        y += p[h + row + ".bias"]
        y, keep_mask = self._dropout(y, dropout_seed, i, site)
        out, norm_cache = ops.layernorm_forward(x + y, p[h + norm + ".weight"], p[h + norm + ".bias"],
                                                self.config.layer_norm_epsilon)
        return out, {"row_input": row_input, "dropout": keep_mask, "norm": norm_cache}

    def block_forward(self, i, x, dropout_seed=None):
        """Layer i: x (B, T, C) -> (B, T, C)."""
        p, h = self.params, layer_prefix(i)
        a = self.input_region.forward(x, self.tp)
        qkv, _ = ops.linear_forward(a, p[h + "attention.qkv.weight"], p[h + "attention.qkv.bias"])
        B, T = qkv.shape[:2]
        rng = self._rng(dropout_seed, i, ATTN_PROBS, (B, self.config.n_head, T, T), (slice(None), self.heads))
        y, attention = attention_ops.self_attention_forward(qkv, self.local_heads,
                                                           dropout_p=self.config.dropout if rng else 0.0, rng=rng)
        mid, attention_exit = self._sublayer_exit(i, x, y, "attention.output.dense", "attention.output.LayerNorm",
                                                  dropout_seed, ATTN_RESIDUAL)
        f, _ = ops.linear_forward(self.input_region.forward(mid, self.tp), p[h + "intermediate.dense.weight"],
                                  p[h + "intermediate.dense.bias"])
        g, gelu = edo.gelu_erf_forward(f)
        out, mlp_exit = self._sublayer_exit(i, mid, g, "output.dense", "output.LayerNorm", dropout_seed, MLP_RESIDUAL)
        return out, self.memory.hold({"x": x, "attention": attention, "attention_exit": attention_exit,
                                      "mid": mid, "gelu": gelu, "mlp_exit": mlp_exit})

    def _sublayer_exit_backward(self, i, cache, dout, row, norm, deferred):
        """-> (d of the residual input, d of the local op's output); the row linear's weight
        gradient goes to `deferred`."""
        p, h = self.params, layer_prefix(i)
        dsum, deferred.grads[h + norm + ".weight"], deferred.grads[h + norm + ".bias"] = \
            ops.layernorm_backward(dout, cache["norm"], p[h + norm + ".weight"])
        dy = self.output_region.backward(ops.dropout_backward(dsum, cache["dropout"]), self.tp)
        deferred.pending.append((h + row, cache["row_input"], dy))
        return dsum, ops.linear_backward_input(dy, p[h + row + ".weight"])

    def _column_backward(self, i, x, dout, column, deferred):
        """The column linear fed by input_region(x): -> dx; its weight gradient goes to `deferred`
        (its input gathered again, with sequence parallelism, from the cached shard)."""
        h = layer_prefix(i)
        deferred.pending.append((h + column, self.input_region.forward(x, self.tp), dout))
        return self.input_region.backward(ops.linear_backward_input(dout, self.params[h + column + ".weight"]), self.tp)

    def block_backward_input(self, i, cache, dout):
        """dout (B, T, C) -> (dx, deferred weight gradients for `block_backward_weight`)."""
        self.memory.release(cache)
        deferred = SimpleNamespace(layer=i, grads={}, pending=[])
        dmid, dg = self._sublayer_exit_backward(i, cache["mlp_exit"], dout, "output.dense", "output.LayerNorm",
                                                deferred)
        df = edo.gelu_erf_backward(dg, cache["gelu"])
        dmid = dmid + self._column_backward(i, cache["mid"], df, "intermediate.dense", deferred)
        dx, dy = self._sublayer_exit_backward(i, cache["attention_exit"], dmid, "attention.output.dense",
                                              "attention.output.LayerNorm", deferred)
        dqkv, _ = attention_ops.self_attention_backward(dy, cache["attention"], self.local_heads)
        dx = dx + self._column_backward(i, cache["x"], dqkv, "attention.qkv", deferred)
        self.memory.hold(deferred.pending)
        return dx, deferred

    def block_backward_weight(self, deferred) -> dict:
        """The deferred linear weight gradients -> grads of every parameter of the layer."""
        self.memory.release(deferred.pending)
        # A row-parallel linear's dout is whole (after the output region), so its bias gradient is
        # the full one on every rank, as its bias is whole.
        for prefix, x, dout in deferred.pending:
            deferred.grads[prefix + ".weight"], deferred.grads[prefix + ".bias"] = ops.linear_backward_weight(dout, x)
        deferred.pending = []
        return deferred.grads

    def block_backward(self, i, cache, dout):
        dx, deferred = self.block_backward_input(i, cache, dout)
        return dx, self.block_backward_weight(deferred)

    # ---- masked-LM head ------------------------------------------------------------------------------
    def _logits(self, x):
        """-> (local logits (B, T, V/tp), caches of the transform and of the decoder's input)."""
        p = self.params
        t, transform = edo.mlm_transform_forward(x, p[HEAD + "transform.dense.weight"],
                                                 p[HEAD + "transform.dense.bias"],
                                                 p[HEAD + "transform.LayerNorm.weight"],
                                                 p[HEAD + "transform.LayerNorm.bias"], self.config.layer_norm_epsilon)
        a = self.input_region.forward(t, self.tp)
        logits, _ = edo.tied_decoder_forward(a, p[WORD_EMBEDDINGS], p[HEAD + "bias"])
        return logits, transform, a

    def head_forward(self, x, targets):
        """x (B, T, C), targets int (B, T) (-100 where no loss; with the next-sentence head, the
        label at [:, 0]) -> (mean loss over the chosen positions (+ the next-sentence loss), cache)."""
        next_sentence = None
        if self.config.next_sentence:
            nsp_loss, next_sentence = self._next_sentence_forward(x, targets[:, 0])
            targets = targets.copy()
            targets[:, 0] = IGNORE_INDEX
        logits, transform, a = self._logits(x)
        if self.stage.tensor_parallel:
            loss, ce = vocab_parallel_cross_entropy_forward(logits, targets, self.vocab_start, self.config.vocab_size,
                                                            self.tp, IGNORE_INDEX)
        else:
            loss, ce = ops.cross_entropy_forward(logits, targets, IGNORE_INDEX, overwrite_logits=True)
        if next_sentence is not None:
            loss += nsp_loss
        return loss, self.memory.hold({"transform": transform, "decoder_input": a, "cross_entropy": ce,
                                       "next_sentence": next_sentence})

    def head_backward(self, cache, dloss):
        dx, grads = self._mlm_head_backward(cache, dloss)
        if cache["next_sentence"] is not None:
            dfirst, nsp_grads = self._next_sentence_backward(cache["next_sentence"], dloss)
            grads.update(nsp_grads)
            if not self.stage.sequence_parallel or self.stage.tp_rank == 0:  # the rank holding position 0
                dx[:, 0] += dfirst
        return dx, grads

    # ---- next-sentence head: replicated, on the [CLS] row (gathered from tp rank 0's shard) ---------
    def _first_row(self, x):
        return all_gather_sequence(x, self.tp)[:, 0] if self.stage.sequence_parallel else x[:, 0]

    def _next_sentence_logits(self, x):
        p = self.params
        first = self._first_row(x)
        pooled = self.xp.tanh(ops.linear_forward(first, p["pooler.dense.weight"], p["pooler.dense.bias"])[0])
        logits, _ = ops.linear_forward(pooled, p["cls.seq_relationship.weight"], p["cls.seq_relationship.bias"])
        return logits, first, pooled

    def _next_sentence_forward(self, x, labels):
        """-> (mean cross-entropy of the (B, 2) logits against labels int (B,), cache)."""
        logits, first, pooled = self._next_sentence_logits(x)
        loss, ce = ops.cross_entropy_forward(logits[:, None, :], labels[:, None])
        return loss, {"first": first, "pooled": pooled, "cross_entropy": ce}

    def _next_sentence_backward(self, cache, dloss):
        """-> (d of the [CLS] row (B, C), grads of the next-sentence head)."""
        p, pooled = self.params, cache["pooled"]
        dlogits = ops.cross_entropy_backward(cache["cross_entropy"], dloss)[:, 0].astype(pooled.dtype, copy=False)
        dw_nsp, db_nsp = ops.linear_backward_weight(dlogits, pooled)
        dh = ops.linear_backward_input(dlogits, p["cls.seq_relationship.weight"]) * (1 - pooled * pooled)
        dw_pool, db_pool = ops.linear_backward_weight(dh, cache["first"])
        return ops.linear_backward_input(dh, p["pooler.dense.weight"]), {
            "pooler.dense.weight": dw_pool, "pooler.dense.bias": db_pool,
            "cls.seq_relationship.weight": dw_nsp, "cls.seq_relationship.bias": db_nsp}

    def next_sentence_logits(self, x):
        """x (B, T, C) -> the next-sentence logits (B, 2) (0: B follows A, 1: B is random)."""
        return self._next_sentence_logits(x)[0]

    def _mlm_head_backward(self, cache, dloss):
        self.memory.release(cache)
        p, a = self.params, cache["decoder_input"]
        backward = vocab_parallel_cross_entropy_backward if self.stage.tensor_parallel else ops.cross_entropy_backward
        dlogits = backward(cache["cross_entropy"], dloss).astype(a.dtype, copy=False)
        da, dword, dbias = edo.tied_decoder_backward(dlogits, a, p[WORD_EMBEDDINGS])
        dt = self.input_region.backward(da, self.tp)
        dx, dw, db, dln_w, dln_b = edo.mlm_transform_backward(dt, cache["transform"],
                                                             p[HEAD + "transform.dense.weight"],
                                                             p[HEAD + "transform.LayerNorm.weight"])
        return dx, {WORD_EMBEDDINGS: dword, HEAD + "bias": dbias, HEAD + "transform.dense.weight": dw,
                    HEAD + "transform.dense.bias": db, HEAD + "transform.LayerNorm.weight": dln_w,
                    HEAD + "transform.LayerNorm.bias": dln_b}

    def head_logits(self, x):
        """x (B, T, C) -> full logits (B, T, vocab_size), the vocabulary shards gathered."""
        local = self._logits(x)[0]
        if not self.stage.tensor_parallel:
            return local
        gathered = self.tp.all_gather(self.xp.ascontiguousarray(local.transpose(2, 0, 1)))  # vocab first
        return gathered.transpose(1, 2, 0)[..., :self.config.vocab_size]

"""The pre-LN transformer block as op pairs, written once for the dense GPT and the tensor-parallel
stage.

Block i is two residual sublayers, attention then MLP, each

    entry:  LayerNorm → input region → column-parallel linear
            local op: causal attention over this rank's heads, or GELU
    exit:   row-parallel linear → output region → + bias → dropout → + sublayer input

The regions are where the two models differ: identities in the dense model (whose "parallel" linears
hold the whole matrices), the communications of model/parallel/tensor_parallel_communications.py in
the tensor-parallel stage. The row-parallel bias is whole on every rank, so it is added once, after
the output region has summed the partial products.

The backward is split as pipeline schedules want it: `block_backward_input` now, the linears' weight
gradients later (`DeferredWeightGrads`, `block_backward_weight`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ringpipe.model.nn import causal_attention, ops

# Dropout sites. A mask is drawn from (dropout_seed, layer, site), so a recompute draws it again
# and a tensor-parallel rank can draw the dense model's mask and keep its slice. The embedding is
# layer -1.
EMBEDDING, ATTN_PROBS, ATTN_RESIDUAL, MLP_RESIDUAL = range(4)
# A block's linears (parameter prefixes); on a tie in size the earlier comes first in
# `block_backward_weight_parts`.
LINEARS = ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj")


def dropout_generator_seed(dropout_seed: int, layer: int, site: int) -> int:
    """Seed of the generator drawing the dropout mask at (layer, site) of a step's dropout_seed."""
    return int(np.random.SeedSequence([dropout_seed, layer + 1, site]).generate_state(1)[0])


class IdentityRegion:
    """The dense model's region around its linears: nothing to communicate, forward or backward."""

    @staticmethod
    def forward(x, comm):
        return x

    backward = forward


@dataclass
class DeferredWeightGrads:
    """What a block's backward_input leaves for backward_weight: the gradients already known
    and, per linear, (param prefix, cached input x, dout) in `pending`."""
    layer: int
    grads: dict
    pending: list
    defer: bool = True  # False: linear weight grads are computed at once, while dout is hot

    def add(self, prefix, x, dout):
        if self.defer:
            self.pending.append((prefix, x, dout))
        else:
            name = f"h.{self.layer}.{prefix}"
            self.grads[name + ".weight"], self.grads[name + ".bias"] = \
                ops.linear_backward_weight(dout, x)


class TransformerBlocks:
    """Blocks `h.{i}.*`: forward, backward-input, deferred weight gradients, recompute.

    Mixed into a model that provides
        config          GPTConfig (dropout, recompute)
        params          GPT-2 parameter names -> arrays (this rank's shards)
        memory          ActivationMemory, holding every cache
        xp              the array module (NumPy or CuPy)
        local_heads     attention heads computed here (n_head / tensor-parallel size)
        input_region, output_region, tp
                        the regions around the column- and row-parallel linears,
                        `forward(x, tp)` and `backward(dy, tp)`, and the communicator they take
        _dropout(x, dropout_seed, layer, site) -> (x, keep_mask)
        _attention_dropout_rng(dropout_seed, layer, batch, length) -> generator or None
    """

    # With config.recompute, backward rebuilds the caches from the block input. One half at a time
    # keeps at most half a block's cache alive, for a second attention forward; the tensor-parallel
    # stage rebuilds both halves at once, as that second forward would repeat its collectives.
    recompute_one_half_at_a_time = True

    # ---- the two sublayers -----------------------------------------------------------------
    def _attention_half(self, i, x, dropout_seed):
        """x -> x + dropout(c_proj(attn(c_attn(ln_1(x))))), cache of every op."""
        qkv, ln_1, c_attn = self._entry_forward(i, x, "ln_1", "attn.c_attn")
        rng = self._attention_dropout_rng(dropout_seed, i, qkv.shape[0], qkv.shape[1])
        y, attn = causal_attention.attention_forward(qkv, self.local_heads,
                                        self.config.dropout if rng else 0.0, rng,
                                        self.config.attention_scale(i))
        out, c_proj, keep_mask = self._exit_forward(i, x, y, "attn.c_proj", dropout_seed,
                                                    ATTN_RESIDUAL)
        return out, {"ln_1": ln_1, "attn.c_attn": c_attn, "attn": attn, "attn.c_proj": c_proj,
                     "attn.dropout": keep_mask}

    def _mlp_half(self, i, x, dropout_seed):
        """x -> x + dropout(c_proj(gelu(c_fc(ln_2(x))))), cache of every op."""
        f, ln_2, c_fc = self._entry_forward(i, x, "ln_2", "mlp.c_fc")
        g, gelu = ops.gelu_forward(f)
        out, c_proj, keep_mask = self._exit_forward(i, x, g, "mlp.c_proj", dropout_seed,
                                                    MLP_RESIDUAL)
        return out, {"ln_2": ln_2, "mlp.c_fc": c_fc, "gelu": gelu, "mlp.c_proj": c_proj,
                     "mlp.dropout": keep_mask}

    def _mlp_half_backward_input(self, i, cache, dout, deferred):
        dg = self._exit_backward_input(i, cache, dout, "mlp.c_proj", "mlp.dropout", deferred)
        df = ops.gelu_backward(dg, cache["gelu"])
        return self._entry_backward_input(i, cache, df, dout, "ln_2", "mlp.c_fc", deferred)

    def _attention_half_backward_input(self, i, cache, dout, deferred):
        dy = self._exit_backward_input(i, cache, dout, "attn.c_proj", "attn.dropout", deferred)
        dqkv = causal_attention.attention_backward(dy, cache["attn"], self.local_heads,
                                      self.config.attention_scale(i))
        return self._entry_backward_input(i, cache, dqkv, dout, "ln_1", "attn.c_attn", deferred)

    # ---- a sublayer's entry and exit, the op pairs around its local op ---------------------
    def _entry_forward(self, i, x, norm, column):
        """LayerNorm → input region → column-parallel linear -> (out, norm cache, linear cache).

        The linear's cache is its input from before the region: with sequence parallelism that is
        this rank's positions only, and the backward gathers them again for the weight gradient
        (as Megatron-LM does), so no activation is kept whole along both sequence and hidden axes.
        The other regions' forward is the identity, so there the cache is the linear's input."""
        p, norm, column = self.params, f"h.{i}.{norm}", f"h.{i}.{column}"
        a, norm_cache = ops.layernorm_forward(x, p[norm + ".weight"], p[norm + ".bias"],
                                              self.config.layer_norm_epsilon)
        out, _ = ops.linear_forward(self.input_region.forward(a, self.tp), p[column + ".weight"],
                                    p[column + ".bias"])
        return out, norm_cache, a

    def _entry_backward_input(self, i, cache, dout_column, dout_sublayer, norm, column, deferred):
        """-> dx of the sublayer input: through the column linear, the region, the LayerNorm and
        the residual (dout_sublayer); the linear's weight gradient goes to `deferred`."""
        p, h = self.params, f"h.{i}."
        deferred.add(column, self.input_region.forward(cache[column], self.tp), dout_column)
        da = ops.linear_backward_input(dout_column, p[h + column + ".weight"])
        da = self.input_region.backward(da, self.tp)
        dx, deferred.grads[h + norm + ".weight"], deferred.grads[h + norm + ".bias"] = \
            ops.layernorm_backward(da, cache[norm], p[h + norm + ".weight"])
        dx += dout_sublayer  # residual
        return dx

    def _exit_forward(self, i, x, y, row, dropout_seed, site):
        """Row-parallel linear → output region → + bias → dropout → + x.

        -> (out, linear cache, dropout mask). The bias is whole on every rank, so it is added once,
        after the output region has summed the partial products."""
        p, row = self.params, f"h.{i}.{row}"
        y, row_cache = ops.linear_forward(y, p[row + ".weight"])
        y = self.output_region.forward(y, self.tp)
        y += p[row + ".bias"]
        y, keep_mask = self._dropout(y, dropout_seed, i, site)
        return ops.residual_forward(x, y), row_cache, keep_mask

    def _exit_backward_input(self, i, cache, dout, row, dropout, deferred):
        """-> the gradient of the local op's output; the row linear's weight gradient (whole dy: its
        bias gradient is the same on every rank) goes to `deferred`."""
        dy = self.output_region.backward(ops.dropout_backward(dout, cache[dropout]), self.tp)
        deferred.add(row, cache[row], dy)
        return ops.linear_backward_input(dy, self.params[f"h.{i}.{row}.weight"])

    # ---- block i ---------------------------------------------------------------------------
    def block_forward(self, i, x, dropout_seed=None):
        """Block i: x (B, T, C) -> (B, T, C). With config.recompute the cache is only x."""
        if self.config.recompute:
            out, _ = self._mlp_half(i, self._attention_half(i, x, dropout_seed)[0], dropout_seed)
            return out, self.memory.hold({"input": x, "dropout_seed": dropout_seed})
        x, attention_cache = self._attention_half(i, x, dropout_seed)
        out, mlp_cache = self._mlp_half(i, x, dropout_seed)
        return out, self.memory.hold({**attention_cache, **mlp_cache})

    def block_backward_input(self, i, cache, dout, defer=True):
        """dout (B, T, C) -> (dx (B, T, C), DeferredWeightGrads for `block_backward_weight`).

        Frees the block cache; the deferred work keeps only the linears' inputs and douts.
        """
        self.memory.release(cache)
        deferred = DeferredWeightGrads(i, {}, [], defer)
        if not self.config.recompute:
            dx = self._mlp_half_backward_input(i, cache, dout, deferred)
            dx = self._attention_half_backward_input(i, cache, dx, deferred)
        elif self.recompute_one_half_at_a_time:
            x, seed = cache["input"], cache["dropout_seed"]
            x_mid = self._attention_half(i, x, seed)[0]
            mlp_cache = self.memory.hold(self._mlp_half(i, x_mid, seed)[1])
            del x_mid
            dx = self._mlp_half_backward_input(i, mlp_cache, dout, deferred)
            self.memory.release(mlp_cache)
            attention_cache = self.memory.hold(self._attention_half(i, x, seed)[1])
            dx = self._attention_half_backward_input(i, attention_cache, dx, deferred)
            self.memory.release(attention_cache)
        else:
            x, seed = cache["input"], cache["dropout_seed"]
            x_mid, attention_cache = self._attention_half(i, x, seed)
            cache = self.memory.hold({**attention_cache, **self._mlp_half(i, x_mid, seed)[1]})
            del x_mid, attention_cache
            dx = self._mlp_half_backward_input(i, cache, dout, deferred)
            dx = self._attention_half_backward_input(i, cache, dx, deferred)
            self.memory.release(cache)
        self.memory.hold(deferred.pending)
        return dx, deferred

    def block_backward_weight(self, deferred):
        """Runs the deferred linear weight gradients -> grads of every parameter of the block."""
        for _ in self.block_backward_weight_parts(deferred):
            pass
        return deferred.grads

    def block_backward_weight_parts(self, deferred):
        """`block_backward_weight` a linear at a time: yields {name: gradient} of what
        backward_input already knew, then of each linear as soon as it is computed, the largest
        first. A data-parallel bucket so starts on a block's gradients while the rest are computed,
        and what is left for after backward is the block's smallest linear, not the whole block."""
        self.memory.release(deferred.pending)
        pending, deferred.pending, deferred.defer = deferred.pending, [], False
        yield dict(deferred.grads)
        order = {prefix: i for i, prefix in enumerate(self.linears_largest_first(deferred.layer))}
        pending.sort(key=lambda entry: order.get(entry[0], len(order)))  # (stable: others after, as added)
        for entry in pending:
            deferred.add(*entry)
            name = f"h.{deferred.layer}.{entry[0]}"
            yield {key: deferred.grads[key] for key in (name + ".weight", name + ".bias") if key in deferred.grads}

    def linears_largest_first(self, i) -> list[str]:
        """Block i's linears (parameter prefixes) in the order `block_backward_weight_parts` computes
        them: by this rank's weight size, largest first (the MLP's before the attention's on a tie)."""
        return sorted(LINEARS, key=lambda prefix: -self.params[f"h.{i}.{prefix}.weight"].size)

    def block_weight_parts_names(self, i) -> list[list[str]]:
        """The parameter names of block i in the groups `block_backward_weight_parts` yields them, in
        its order: the LayerNorms (known after backward_input), then each linear's weight and bias.
        The data-parallel buffers are laid out in this order (model/parallel/stage.py)."""
        linears = [[f"h.{i}.{prefix}.weight", f"h.{i}.{prefix}.bias"] for prefix in self.linears_largest_first(i)]
        in_linears = {name for group in linears for name in group}
        norms = [name for name in self.params if name.startswith(f"h.{i}.") and name not in in_linears]
        return [norms] + linears

    def block_forward_cached(self, i, x, kv, start):
        """Inference: block i over positions start .. start + T of x (B, T, C) -> (B, T, C).

        kv = (keys, values), each (B, local_heads, block_size, head size): this rank's heads of the
        earlier positions, to which the new positions' keys and values are written (the cache is split
        by heads like c_attn's columns). No dropout and no activations kept."""
        keys, values = kv
        B, T, _ = x.shape
        qkv, _, _ = self._entry_forward(i, x, "ln_1", "attn.c_attn")
        q, k, v = causal_attention.split_heads(qkv, self.local_heads)
        keys[:, :, start:start + T] = k
        values[:, :, start:start + T] = v
        scores = q @ keys[:, :, :start + T].swapaxes(-1, -2)
        scores *= self.config.attention_scale(i)
        # Query t (absolute start + t) may see keys 0 .. start + t.
        scores += self.xp.triu(self.xp.full((T, start + T), -self.xp.inf, dtype=scores.dtype), k=start + 1)
        y = causal_attention.softmax_forward(scores) @ values[:, :, :start + T]
        y = y.transpose(0, 2, 1, 3).reshape(B, T, -1)
        x, _, _ = self._exit_forward(i, x, y, "attn.c_proj", None, ATTN_RESIDUAL)
        return self._mlp_half(i, x, None)[0]

    def block_backward(self, i, cache, dout):
        """Fused backward of block i: dout (B, T, C) -> (dx, grads of the block's parameters)."""
        dx, deferred = self.block_backward_input(i, cache, dout, defer=False)
        return dx, self.block_backward_weight(deferred)

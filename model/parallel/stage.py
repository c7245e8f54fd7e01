"""One rank's part of the model in a parallel layout: a contiguous range of layers, plus the
embedding on the first pipeline stage and the final LayerNorm, LM head and loss on the last.

Every parallel schedule talks to a stage through the same four calls, so pipeline executors do not
care whether the stage is dense or tensor-parallel:

    output, cache = stage.forward(inputs, targets, dropout_seed)
        first stage: inputs = token ids (B, T); otherwise hidden states (B, T, C)
        last stage:  output = the micro-batch's mean loss (float); otherwise hidden states
    dinputs, deferred = stage.backward_input(cache, doutput, last=False)
        last stage: doutput = d(total loss)/d(this micro-batch's loss), a float
        first stage: dinputs = None
    stage.backward_weight(deferred, last=False)  # weight gradients; may run later (zero-bubble W)
    stage.grads                         # accumulated gradients, keyed like stage.params

Gradient readiness (for data-parallel buckets): the executor passes `last=True` to the stage's last
backward_input and last backward_weight of the step. During those calls, as soon as a group of
gradients has received its final contribution, the stage calls `stage.on_grads_final(names)` (when
set). `stage.grad_groups_in_ready_order()` lists those groups in the order they are reported. The
tied wte is reported once per stage, after the stage's last contribution to it.

`DenseStage` wraps the dense GPT's op pairs; the tensor-parallel stage mirrors it.
"""
from __future__ import annotations

from model.gpt2.config import GPTConfig
from model.gpt2.model import GPT


def stage_param_names(config: GPTConfig, layers: range, first: bool, last: bool) -> list[str]:
    """GPT-2 parameter names held by a stage (the tied wte lives on the first and the last)."""
    names = []
    if first:
        names += ["wte.weight", "wpe.weight"]
    for i in layers:
        names += [f"h.{i}.{p}" for p in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                                         "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                         "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")]
    if last:
        if not first:
            names.append("wte.weight")
        names += ["ln_f.weight", "ln_f.bias"]
    return names


class DenseStage:
    """Layers `layers` of a dense GPT (and embedding/head when first/last), with accumulated grads."""

    def __init__(self, config: GPTConfig, full_params: dict, layers: range, first: bool, last: bool):
        self.config, self.layers, self.first, self.last = config, layers, first, last
        names = stage_param_names(config, layers, first, last)
        self.gpt = GPT(config, params={name: full_params[name] for name in names})
        self.params = self.gpt.params
        self.xp = self.gpt.xp
        self.grads = {name: self.xp.zeros_like(p) for name, p in self.params.items()}
        self.shard_axes = {name: None for name in names}  # nothing is split across tensor-parallel ranks
        self.replicated_names = list(names)  # every gradient is whole on this rank
        self.tp_partial_names = []  # and none needs summing over tensor-parallel ranks
        self.on_grads_final = None  # callback(names) for data-parallel buckets; see the module docstring

    def grad_groups_in_ready_order(self) -> list[list[str]]:
        """Parameter names in the groups, and the order, that `on_grads_final` reports them: head and
        embedding during backward_input, then the blocks (last first) during backward_weight."""
        groups = [self._head_names()] if self.last else []
        if self.first:
            groups.append(["wpe.weight", "wte.weight"])
        return groups + [self._block_names(i) for i in reversed(self.layers)]

    def _head_names(self) -> list[str]:
        # On a stage that also embeds, wte gets its last contribution from the embedding backward.
        return ["ln_f.weight", "ln_f.bias"] + ([] if self.first else ["wte.weight"])

    def _block_names(self, i: int) -> list[str]:
        return [name for name in self.params if name.startswith(f"h.{i}.")]

    def _report_final(self, names: list[str]):
        if self.on_grads_final is not None:
            self.on_grads_final(names)

    def finalize_grads(self):
        """Nothing to do: a dense stage's gradients are complete after backward."""

    @property
    def memory(self):
        return self.gpt.memory

    def zero_grads(self):
        for g in self.grads.values():
            g[...] = 0

    def forward(self, inputs, targets=None, dropout_seed=None):
        caches = []
        x = inputs
        if self.first:
            x, cache = self.gpt.embedding_forward(inputs, dropout_seed)
            caches.append(("embedding", cache))
        for i in self.layers:
            x, cache = self.gpt.block_forward(i, x, dropout_seed)
            caches.append((i, cache))
        if self.last:
            loss, cache = self.gpt.head_forward(x, targets)
            caches.append(("head", cache))
            return loss, caches
        return x, caches

    def backward_input(self, caches, doutput, last: bool = False):
        grads, deferred = self.grads, []
        dx = doutput
        while caches:
            kind, cache = caches.pop()
            if kind == "head":
                dx, head_grads = self.gpt.head_backward(cache, doutput)
                _accumulate(grads, head_grads)
                if last:
                    self._report_final(self._head_names())
            elif kind == "embedding":
                _, embedding_grads = self.gpt.embedding_backward(cache, dx)
                _accumulate(grads, embedding_grads)
                dx = None
                if last:
                    self._report_final(["wpe.weight", "wte.weight"])
            else:
                dx, block_deferred = self.gpt.block_backward_input(kind, cache, dx)
                deferred.append(block_deferred)
        return dx, deferred

    def backward_weight(self, deferred, last: bool = False):
        for block_deferred in deferred:
            _accumulate(self.grads, self.gpt.block_backward_weight(block_deferred))
            if last:
                self._report_final(self._block_names(block_deferred.layer))


def _accumulate(into: dict, grads: dict):
    for name, g in grads.items():
        into[name] += g

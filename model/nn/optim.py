"""AdamW (decoupled weight decay on 2-D weights), global-norm clipping, warmup + cosine schedule.

The update rule `adamw_update` is a pure in-place function on arrays, so the same code updates a
whole parameter dict (`AdamW`) or a flat 1-D shard of all parameters (ZeRO-1: each data-parallel
rank owns a slice of param, grad, m and v, plus the matching slice of per-element decay rates).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ringpipe.model.nn import kernels
from ringpipe.runtime.array_module import module_of, to_host


def adamw_update(param, grad, m, v, step: int, lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay=0.0) -> None:
    """One AdamW step, in place on param, m, v (all the same shape as grad).

    `step` counts updates including this one (1 on the first). `weight_decay` is a float, or an
    array of per-element rates (0 where a parameter must not decay) for flat shards.
    """
    xp = module_of(param)
    root = math.sqrt(1.0 - beta2 ** step)
    rate_arrays = () if isinstance(weight_decay, (int, float)) else (weight_decay,)
    if kernels.usable(param, grad, m, v, *rate_arrays):
        kernels.adamw_update(param, grad, m, v, lr, weight_decay, beta1, beta2,
                             lr / (1.0 - beta1 ** step) * root, eps * root)
        return
    # Decoupled decay (Loshchilov & Hutter): shrink the weights, independent of the gradient.
    if isinstance(weight_decay, (int, float)):
        if weight_decay:
            param *= 1.0 - lr * weight_decay
    else:
        param -= (lr * weight_decay) * param
    # Every pass below writes in place, into m, v or the one work buffer: a temporary per
    # expression would cost an allocation and an extra pass over memory each.
    work = xp.multiply(grad, 1.0 - beta1)
    m *= beta1
    m += work
    xp.multiply(grad, grad, out=work)
    work *= 1.0 - beta2
    v *= beta2
    v += work
    # p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps), with sqrt(1-b2^t) moved into the
    # numerator so that the bias corrections stay scalars.
    xp.sqrt(v, out=work)
    work += eps * root
    xp.divide(m, work, out=work)
    work *= lr / (1.0 - beta1 ** step) * root
    param -= work


def grad_norm(grads: dict) -> float:
    """The global L2 norm of all gradients together."""
    return math.sqrt(sum(float(module_of(g).vdot(g.ravel(), g.ravel())) for g in grads.values()))


def clip_scale(norm: float, max_norm: float | None) -> float:
    """The factor that brings a gradient of global norm `norm` down to `max_norm` (1 if below)."""
    if not max_norm or norm <= max_norm:
        return 1.0
    return max_norm / (norm + 1e-6)


def clip_grad_norm(grads: dict, max_norm: float | None) -> float:
    """Scale all gradients in place so their global norm is at most `max_norm`; returns the
    norm before clipping. `max_norm` None or 0 disables clipping."""
    norm = grad_norm(grads)
    scale = clip_scale(norm, max_norm)
    if scale != 1.0:
        for g in grads.values():
            g *= scale
    return norm


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total_steps: int) -> float:
    """Learning rate at 0-based `step`: linear warmup over `warmup` steps, then cosine decay from
    `lr` to `min_lr` at `total_steps`, then `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def decays(param) -> bool:
    """Whether a parameter gets weight decay: 2-D matrices (linear weights and embeddings) do;
    biases and LayerNorm gains (1-D) do not."""
    return param.ndim == 2


class FlatArrays(dict):
    """A dict of arrays, name -> shape, that are views into one 1-D buffer `flat`, laid out in
    `order` (decaying parameters first, see `flat_order`). AdamW updates such parameters in a
    few passes over the whole buffer instead of a dozen small calls per parameter."""

    def __init__(self, flat, shapes: dict, order):
        views, offset = {}, 0
        for name in order:
            size = math.prod(shapes[name])
            views[name] = flat[offset:offset + size].reshape(shapes[name])
            offset += size
        if offset != flat.size:
            raise ValueError(f"flat buffer holds {flat.size} elements, the layout {offset}")
        super().__init__((name, views[name]) for name in shapes)
        self.flat, self.order = flat, tuple(order)
        self._views = views

    def intact(self) -> bool:
        """Whether every entry is still its view (code that rebinds a name breaks the layout)."""
        return len(self) == len(self._views) and all(
            self.get(name) is view for name, view in self._views.items())


def flat_order(params: dict) -> list:
    """Names in the order a FlatArrays lays them out: the decaying ones first, so that one
    weight-decay rate covers a prefix of the buffer."""
    return sorted(params, key=lambda name: not decays(params[name]))


class AdamW:
    """AdamW over a dict of parameters; state is (m, v) per parameter and the update count."""

    def __init__(self, params: dict, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, threads: int = 1):
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = {name: weight_decay if decays(p) else 0.0
                             for name, p in params.items()}
        xp = module_of(next(iter(params.values())))
        self._flat_params = params if isinstance(params, FlatArrays) and params.intact() else None
        if self._flat_params is not None:
            shapes = {name: p.shape for name, p in params.items()}
            self.m = FlatArrays(xp.zeros_like(params.flat), shapes, params.order)
            self.v = FlatArrays(xp.zeros_like(params.flat), shapes, params.order)
            # [start, stop) ranges of the flat buffer with one decay rate each
            self._decay_ranges, offset = [], 0
            for name in params.order:
                rate, size = self.weight_decay[name], params[name].size
                if self._decay_ranges and self._decay_ranges[-1][2] == rate:
                    self._decay_ranges[-1][1] += size
                else:
                    self._decay_ranges.append([offset, offset + size, rate])
                offset += size
        else:
            self.m = {name: xp.zeros_like(p) for name, p in params.items()}
            self.v = {name: xp.zeros_like(p) for name, p in params.items()}
        self.step_count = 0
        self.threads = threads
        self._executor = None

    def update(self, params: dict, grads: dict, lr: float) -> None:
        """Apply one AdamW step to `params` in place.

        When params (the ones given at construction) and grads are both intact FlatArrays of one
        layout, the update runs over whole buffer ranges, split over `threads` threads (NumPy
        releases the GIL inside each pass); otherwise parameter by parameter.
        """
        self.step_count += 1
        if (params is self._flat_params and isinstance(grads, FlatArrays)
                and grads.order == params.order and params.intact() and grads.intact()):
            self._update_flat(params.flat, grads.flat, lr)
            return
        for name, param in params.items():
            adamw_update(param, grads[name], self.m[name], self.v[name], self.step_count, lr,
                         self.beta1, self.beta2, self.eps, self.weight_decay[name])

    def _update_flat(self, param, grad, lr):
        n = param.size
        bounds = [n * k // self.threads for k in range(self.threads + 1)]
        pieces = [[] for _ in range(self.threads)]  # per thread: (start, stop, decay rate)
        for k in range(self.threads):
            for start, stop, rate in self._decay_ranges:
                lo, hi = max(start, bounds[k]), min(stop, bounds[k + 1])
                if lo < hi:
                    pieces[k].append((lo, hi, rate))

        def run(part):
            for lo, hi, rate in part:
                adamw_update(param[lo:hi], grad[lo:hi], self.m.flat[lo:hi], self.v.flat[lo:hi],
                             self.step_count, lr, self.beta1, self.beta2, self.eps, rate)

        if self.threads > 1 and self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads - 1, "adamw")
        futures = [self._executor.submit(run, part) for part in pieces[1:]]
        run(pieces[0])
        for future in futures:
            future.result()

    def state_dict(self) -> dict:
        """Host arrays for a checkpoint: "step", "m.<param name>", "v.<param name>"."""
        state = {"step": np.array(self.step_count, dtype=np.int64)}
        for name in self.m:
            state[f"m.{name}"] = to_host(self.m[name])
            state[f"v.{name}"] = to_host(self.v[name])
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` output (ValueError on missing or misshapen entries)."""
        for name in self.m:
            for moment, key in ((self.m, f"m.{name}"), (self.v, f"v.{name}")):
                if key not in state:
                    raise ValueError(f"optimizer state lacks {key!r}")
                value = state[key]
                if tuple(value.shape) != tuple(moment[name].shape):
                    raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(moment[name].shape)}")
                moment[name][...] = module_of(moment[name]).asarray(value)
        self.step_count = int(state["step"])

"""The single-process training loop as a `Trainer`: data, model, AdamW, checkpoints; no printing.

A run's directory holds `tokens.bin` (the tokenized corpus), `checkpoint/` (the latest resumable
state) and, at the end, the final model (`model.safetensors`, `config.json`, `tokenizer.json`);
model/training/run_dir.py names every file.

Randomness is a pure function of (seed, step): batches come from `TokenDataset.get_batch` and the
dropout seed of each micro-batch from `dropout_seed`, so the checkpointed "RNG state" is just the
seed and the step, and a resumed run repeats an uninterrupted one bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from ringpipe.model.families import family, special_ids
from ringpipe.model.nn.mixed_precision import LossScaledAdamW, LossScaler, is_mixed, weights_dtype
from ringpipe.model.nn.optim import AdamW, FlatArrays, clip_scale, grad_norm, lr_at
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import CHECKPOINT_DIR, OPTIMIZER_FILE, TRAINER_STATE_FILE, find_checkpoint
from ringpipe.model.training.run_setup import RunSetup
from ringpipe.model.training.sharded_checkpoint import is_sharded, load_consolidated
from ringpipe.model.training.step import NonFiniteError, dropout_seed
from ringpipe.runtime.array_module import array_module, to_host
from ringpipe.runtime.files import load_tensors, save_tensors, staged_directory, write_json


def threads_for(config: TrainConfig) -> int:
    """Batch shards run on this many threads: all the cores this process may use. Not with dropout,
    whose masks are drawn per shard: the run would differ from the same model split over workers."""
    if config.model.dropout > 0:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _master_weights(config: TrainConfig, gpt_config, params):
    """A mixed run's float32 master weights, as a model that only holds them (it saves them in the
    checkpoint format); None for other runs."""
    if not is_mixed(config.dtype):
        return None
    return family(config.family).model(dataclasses.replace(gpt_config, dtype=weights_dtype(config.dtype)),
                                       params=params)


def _optimizer(config: TrainConfig, params):
    if is_mixed(config.dtype):
        return LossScaledAdamW(params, (config.beta1, config.beta2), config.eps, config.weight_decay,
                               LossScaler(growth_interval=config.loss_scale_growth_interval))
    return AdamW(params, (config.beta1, config.beta2), config.eps, config.weight_decay)


class Trainer:
    """Model, optimizer and data of one run; `train_step` and `evaluate` return metrics dicts.

    The model is of the run's family (`config.family`, model/families.py); `gpt` is its name from
    when GPT-2 was the only one. In a mixed-precision run `gpt` computes in float16 and `master` (a
    float32 copy that never runs) holds the weights AdamW updates and checkpoints save; `weights`
    is whichever holds them."""

    def __init__(self, config: TrainConfig, run_dir: str, gpt, optimizer, tokenizer, dataset,
                 step: int = 0, master=None):
        self.config, self.run_dir = config, run_dir
        self.gpt, self.optimizer, self.tokenizer, self.dataset = gpt, optimizer, tokenizer, dataset
        self.step = step  # steps completed = the next step to run
        self.xp = array_module(config.device)
        self.family = family(config.family)
        # No tokenizer: a benchmark's run on generated ids, which uses no special token.
        self.objective = self.family.objective(config, gpt.config.vocab_size,
                                               special_ids(tokenizer, self.family) if tokenizer else {})
        self.master = master
        self._master_grads = None if master is None else FlatArrays(
            self.xp.zeros_like(master.params.flat), {n: p.shape for n, p in master.params.items()},
            master.params.order)

    @property
    def model(self):
        """The run's model (of its family)."""
        return self.gpt

    @property
    def weights(self):
        """The model holding the run's weights: the float32 master copy when mixed, else the model."""
        return self.gpt if self.master is None else self.master

    def load_weights(self, params: dict) -> None:
        """Set the run's weights, and the model's (rounded to its dtype), from arrays by name."""
        for model in (self.gpt,) if self.master is None else (self.master, self.gpt):
            for name, param in model.params.items():
                param[...] = model.xp.asarray(params[name])

    @classmethod
    def create(cls, config: TrainConfig, run_dir: str) -> "Trainer":
        """A fresh run: everything is validated before anything is written to `run_dir`."""
        setup = RunSetup.create(config, run_dir)
        model_family = family(config.family)
        gpt_config = config.model_config(setup.vocab_size)
        gpt = model_family.model(gpt_config, seed=config.seed, threads=threads_for(config))
        # Master weights from the same float64 draw as a float32 run's, not from the float16 model.
        master = (_master_weights(config, gpt_config, model_family.init_params(gpt_config, config.seed))
                  if is_mixed(config.dtype) else None)
        optimizer = _optimizer(config, (gpt if master is None else master).params)
        return cls(config, run_dir, gpt, optimizer, setup.tokenizer, setup.write_token_file(), master=master)

    @classmethod
    def resume(cls, config: TrainConfig, run_dir: str) -> "Trainer":
        """Continue the run saved in `run_dir/checkpoint` under `config` (usually the saved one,
        see `saved_config`); ValueError if the checkpoint is missing, corrupt or mismatched."""
        setup = RunSetup.resume(config, run_dir)  # everything but the weights, checked
        checkpoint, model_family, tokenizer = find_checkpoint(run_dir), family(config.family), setup.tokenizer
        try:
            if is_sharded(checkpoint):  # written by a multi-worker run
                saved_config, params, optimizer_state = load_consolidated(checkpoint)
                saved = model_family.model(dataclasses.replace(saved_config, dtype=weights_dtype(config.dtype),
                                                               device=config.device), params=params)
            else:
                saved = model_family.model.from_pretrained(checkpoint, dtype=weights_dtype(config.dtype),
                                                           device=config.device)
                optimizer_state, _ = load_tensors(os.path.join(checkpoint, OPTIMIZER_FILE))
        except Exception as exc:  # any reader error means the same thing to the user
            raise ValueError(f"corrupt checkpoint {checkpoint}: {exc}") from None
        # The run's config is the authority (e.g. dropout); the saved shapes must agree with it.
        gpt_config = config.model_config(tokenizer.vocab_size)
        for name in model_family.architecture_fields:
            if getattr(saved.config, name) != getattr(gpt_config, name):
                raise ValueError(f"checkpoint {checkpoint} has {name} "
                                 f"{getattr(saved.config, name)}, the run expects "
                                 f"{getattr(gpt_config, name)}")
        gpt = model_family.model(gpt_config, params=saved.params, threads=threads_for(config))
        master = _master_weights(config, gpt_config, saved.params)
        optimizer = _optimizer(config, (gpt if master is None else master).params)
        optimizer.load_state_dict(optimizer_state)
        return cls(config, run_dir, gpt, optimizer, tokenizer, setup.write_token_file(), step=setup.step,
                   master=master)

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of `step`, accumulated over micro-batches.

        Returns {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}, plus "skipped":
        True when the loss or gradient norm was not finite and `on_nonfinite` is "skip" (the
        update is not applied); with "stop" that raises NonFiniteError, also before the update.
        A mixed-precision run adds "loss_scale" (the scale this step used) and "skipped" (also on
        an overflow of the scaled backward: no update, grad_norm None, the scale halved; that is
        never an error), see model/nn/mixed_precision.py.
        """
        config, xp = self.config, self.xp
        start = time.perf_counter()
        x, y = self.objective.batch(self.dataset, "train", step)
        rows = config.batch_size // config.microbatches
        mixed = self.master is not None
        loss_scale = self.optimizer.scaler.scale if mixed else 1.0
        total_loss, grads = 0.0, self._master_grads  # mixed: float16 grads add into float32 ones
        for micro in range(config.microbatches):
            rows_of = slice(micro * rows, (micro + 1) * rows)
            seed = dropout_seed(config.seed, step, micro) if config.model.dropout > 0 else None
            loss, micro_grads = self.gpt.loss_and_grads(xp.asarray(x[rows_of]),
                                                        xp.asarray(y[rows_of]), dropout_seed=seed,
                                                        dloss=loss_scale)
            total_loss += loss
            if grads is None:
                grads = micro_grads
            elif mixed and micro == 0:
                for name, g in micro_grads.items():
                    grads[name][...] = g
            else:
                for name, g in micro_grads.items():
                    grads[name] += g
        if config.microbatches > 1 or mixed:
            # Equal-sized micro-batches: the mean of their mean losses is the big batch's mean.
            # A mixed run divides out its loss scale here too, before the norm and clipping.
            for g in grads.values():
                g *= 1.0 / (config.microbatches * loss_scale)
        norm = grad_norm(grads)
        lr = lr_at(step, config.lr, config.min_lr, config.warmup, config.steps)
        loss = total_loss / config.microbatches
        # An overflow in the float16 backward shows as a non-finite norm: the loss scaler's to
        # handle (skip, halve the scale). Otherwise a non-finite loss or norm is the run's fault.
        overflow = mixed and not math.isfinite(norm)
        finite = math.isfinite(loss) and (overflow or math.isfinite(norm))
        if not finite and config.on_nonfinite == "stop":
            raise NonFiniteError.of_step(step, loss, norm)
        applied = finite and (self.optimizer.scaler.update(overflow) if mixed else True)
        if applied:
            clip = clip_scale(norm, config.grad_clip)
            if clip != 1.0:
                for g in grads.values():
                    g *= clip
            self.optimizer.update(self.weights.params, grads, lr)
            if mixed:
                self.gpt.params.flat[...] = self.master.params.flat  # rounded to float16
        self.step = step + 1
        elapsed = time.perf_counter() - start
        tokens = config.batch_size * config.model.block_size
        metrics = {"step": step, "loss": total_loss / config.microbatches, "lr": lr,
                   "grad_norm": None if overflow else norm, "tokens": tokens,
                   "tokens_per_s": tokens / elapsed}
        if mixed:
            metrics.update(loss_scale=loss_scale, skipped=not applied)
        elif not finite:
            metrics["skipped"] = True
        return metrics

    def evaluate(self) -> dict:
        """Mean loss over the same `eval_iters` val batches every time: {"val_loss"}."""
        config, xp = self.config, self.xp
        rows = config.batch_size // config.microbatches
        losses = []
        for i in range(config.eval_iters):
            x, y = self.objective.batch(self.dataset, "val", i)
            for start in range(0, config.batch_size, rows):
                losses.append(self.gpt.loss(xp.asarray(x[start:start + rows]), xp.asarray(y[start:start + rows])))
        return {"val_loss": float(np.mean(losses))}

    def save_checkpoint(self) -> str:
        """Write `run_dir/checkpoint` atomically; returns its path.

        The new checkpoint is written into a temporary directory beside it and swapped in by
        renames, so a crash leaves either the old or the new checkpoint, never a mixture; a
        failed write (full disk) is a FileWriteError and leaves the old one. Weights that are
        not finite are refused (ValueError) so they never replace a good checkpoint.
        """
        self._check_finite("checkpoint")
        final = os.path.join(self.run_dir, CHECKPOINT_DIR)
        with staged_directory(final) as stage:
            self.family.write_checkpoint_files(stage, self.params_on_host(), self.weights.config,
                                               self.tokenizer)
            save_tensors(os.path.join(stage, OPTIMIZER_FILE), self.optimizer.state_dict())
            write_json(os.path.join(stage, TRAINER_STATE_FILE),
                       {"step": self.step, "config": dataclasses.asdict(self.config)}, indent=1)
        return final

    def save_model(self) -> None:
        """Write the final model (weights, config.json, tokenizer.json) into `run_dir`; each
        file is written beside its target and renamed over it."""
        self._check_finite("model")
        self.weights.save_pretrained(self.run_dir, tokenizer=self.tokenizer)

    def params_on_host(self) -> dict:
        return {name: to_host(p) for name, p in self.weights.params.items()}

    def _check_finite(self, what: str) -> None:
        """NonFiniteError if a weight is nan/inf (an update overflowed): it must not be saved."""
        for name, param in self.weights.params.items():
            if not bool(self.xp.isfinite(param).all()):
                raise NonFiniteError(self.step - 1, f"parameter {name} is not finite after the update; "
                                                    f"not writing the {what} (lower --lr)")

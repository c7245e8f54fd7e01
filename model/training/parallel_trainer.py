"""The parallel trainer: a runtime actor, one per rank, for any DP × TP × PP layout.

    trainers = cluster.spawn(ParallelTrainer, train_config_dict, layout_dict, token_file, vocab_size)
    metrics = trainers.train_step(step).result()

Each rank builds the mesh, takes its slice of the full model initialised from the seed (so the
model is the same whatever the layout), runs the pipeline schedule over its share of the step's
global batch, synchronises gradients (tied parameters across the tie group, data-parallel
average), clips by the true global norm and applies AdamW to what it holds. With dp = tp = pp = 1
it computes exactly what the single-process Trainer computes.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.families import family
from ringpipe.model.inference.pipelined_generation import generate_on_mesh
from ringpipe.model.nn.mixed_precision import (LossScaledAdamW, LossScaler, has_overflow, is_mixed, overflow_expected,
                                      weights_dtype)
from ringpipe.model.nn.optim import AdamW, clip_scale, lr_at
from ringpipe.model.parallel.data_parallel import DEFAULT_BUCKET_BYTES, GradientBuckets, ShardedAdamW
from ringpipe.model.parallel.mesh import Mesh, parallel_axes
from ringpipe.model.parallel.plan import stage_param_names, stage_sizes
from ringpipe.model.parallel.pipeline_parallel.executor import run_pipeline_step
from ringpipe.model.parallel.pipeline_parallel.schedules import build_schedule, split_layers, stage_rank
from ringpipe.model.parallel.stage import Stage
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.evaluation import evaluate_rank
from ringpipe.model.training.memory_report import memory_report
from ringpipe.model.training.step import OVERFLOW_WARNINGS, dropout_seed
from ringpipe.runtime.fault_injection import FaultInjector


@dataclass
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    zero: int = 0
    split: list | None = None  # blocks per pipeline stage (p × v entries); None = parameter bytes balanced

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def validate(self, config: TrainConfig) -> None:
        """ValueError before any worker starts, naming the setting that cannot work."""
        for name in ("dp", "tp", "pp", "virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        rows = self.dp * config.microbatches
        if config.batch_size % rows:
            raise ValueError(f"global batch {config.batch_size} is not divisible by dp × microbatches = "
                             f"{self.dp} × {config.microbatches}")
        if config.model.n_head % self.tp:
            raise ValueError(f"--n-head {config.model.n_head} is not divisible by --tp {self.tp}")
        # too few layers, bad split (an encoder-decoder's stages divide both stacks' layers)
        layers, stages = getattr(config.model, "pipeline_layers", config.model.n_layer), self.pp * self.virtual_stages
        if layers < stages:
            virtual = f" × --virtual-stages {self.virtual_stages} = {stages}" if self.virtual_stages > 1 else ""
            raise ValueError(f"{layers} layers cannot fill --pp {self.pp}{virtual} pipeline stages "
                             "(every stage needs at least one layer)")
        split_layers(layers, stages, self.split)
        build_schedule(self.schedule, self.pp, config.microbatches, self.virtual_stages)  # raises on bad rules
        if self.zero not in (0, 1):
            raise ValueError(f"--zero must be 0 or 1, got {self.zero}")
        if self.zero and is_mixed(config.dtype):
            raise ValueError(f"--zero 1 with --dtype {config.dtype}: ZeRO-1 does not shard float32 master "
                             "weights yet; use --zero 0")


class ParallelTrainer:
    def __init__(self, comm, config: dict, layout: dict, token_file: str, vocab_size: int,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, plan: str | None = None, special_ids: dict | None = None):
        """`plan`: "module:callable" making a parallel plan from the model config the TrainConfig
        describes (model/parallel/plan.py); by default the run's family's (model/families.py).
        `special_ids`: {role: id} of the family's special tokens in the run's tokenizer (its
        objective may need them: BERT's mask token)."""
        self.config = TrainConfig(**config)
        warnings.filterwarnings("ignore", OVERFLOW_WARNINGS, RuntimeWarning)  # this worker process only
        self.layout = Layout(**layout)
        self.tracer = comm.tracer
        self.faults = FaultInjector(comm.rank)  # RINGPIPE_FAULT: a testing aid (runtime/fault_injection.py)
        self.family = family(self.config.family)
        self.gpt_config = self.config.model_config(vocab_size)
        self.plan = (self.family.parallel_plan if plan is None else _resolve(plan))(self.gpt_config)
        self.objective = self.family.objective(self.config, vocab_size, special_ids or {})
        self.mesh = Mesh(comm, parallel_axes(self.layout.dp, self.layout.tp, self.layout.pp),
                         ties=bool(self.plan.tied_params))
        self.dataset = TokenDataset.from_file(token_file, self.config.val_fraction)
        p, v = self.layout.pp, self.layout.virtual_stages
        self.num_stages = p * v
        self.schedule = build_schedule(self.layout.schedule, p, self.config.microbatches, v)[self.mesh.pp_rank]
        layer_ranges = split_layers(self.plan.num_layers, self.num_stages, self.layout.split, **stage_sizes(self.plan))
        full = self._initial_params(layer_ranges)
        self.stages = {s: self._make_stage(full, layer_ranges[s], s == 0, s == self.num_stages - 1)
                       for s in range(self.num_stages) if stage_rank(s, p) == self.mesh.pp_rank}
        # Flat parameter/gradient buffers (stage entries become views), reduced in buckets over dp.
        self.gradients = GradientBuckets(self.stages, self.mesh.dp, self.mesh.tie, bucket_bytes,
                                         shard=bool(self.layout.zero))
        self.master = self.master_grads = None
        if is_mixed(self.config.dtype):
            # float32 master weights and gradients laid out like the float16 flat buffers (one copy
            # each way per step), the weights from the float64 init, as a float32 run's.
            xp, flat = self.gradients.xp, self.gradients.flat_params
            self._master_flat = xp.zeros(flat.size, weights_dtype(self.config.dtype))
            self._master_grads_flat = xp.zeros_like(self._master_flat)
            self.master = {name: self.gradients.view(self._master_flat, name) for name in self.gradients.params}
            self.master_grads = {name: self.gradients.view(self._master_grads_flat, name)
                                 for name in self.gradients.params}
            for name, weight in self.master.items():
                weight[...] = xp.asarray(self._shard_of(name, full[name]).astype(weight.dtype))
        del full
        # One optimizer entry per parameter name; a tied parameter may sit in two local stages.
        self.params = {}
        for stage in self.stages.values():
            for name, param in stage.params.items():
                self.params.setdefault(name, param)
        if self.layout.zero:  # where, inside this rank's shards, tp needs summing or counting once
            partial = {name for stage in self.stages.values() for name in stage.tp_partial_names}
            replicated = {name for stage in self.stages.values() for name in stage.replicated_names}
            self._tp_partial_pieces = self.gradients.shard_ranges(partial)
            self._norm_skip = (self.gradients.shard_ranges(replicated)
                               if self.layout.tp > 1 and self.mesh.tp_rank != 0 else [])
        # What this rank's AdamW updates: a tied weight only on the first stage (model/parallel/data_parallel).
        tied = set(self.plan.tied_params)
        self.updated = {name: p for name, p in (self.params if self.master is None else self.master).items()
                        if self.gradients.owns_tied or name not in tied}
        betas = (self.config.beta1, self.config.beta2)
        if self.master is not None:
            self.optimizer = LossScaledAdamW(self.updated, betas, self.config.eps, self.config.weight_decay,
                                             LossScaler(growth_interval=self.config.loss_scale_growth_interval))
        else:
            optimizer = ShardedAdamW if self.layout.zero else AdamW
            self.optimizer = optimizer(self.gradients if self.layout.zero else self.updated, betas, self.config.eps,
                                       self.config.weight_decay)

    def _initial_params(self, layer_ranges: list[range]) -> dict:
        """The full initial values of the parameters this rank's stages hold (all of the model if the
        plan cannot draw a part). A float32 run's are cast while drawn, which shards identically;
        float64 otherwise (a mixed run rounds its float16 model and float32 master from them)."""
        if not hasattr(self.plan, "init_params_of"):
            return self.plan.init_params(self.config.seed)
        last = self.num_stages - 1
        names = {name for s, layers in enumerate(layer_ranges) if stage_rank(s, self.layout.pp) == self.mesh.pp_rank
                 for name in stage_param_names(self.plan, layers, s == 0, s == last)}
        dtype = np.float32 if self.config.dtype == "float32" else np.float64
        return self.plan.init_params_of(self.config.seed, names, dtype)

    def _make_stage(self, full: dict, layers: range, first: bool, last: bool):
        return Stage(self.plan, full, layers, first, last, self.mesh.tp, self.layout.sequence_parallel)

    # ---- one step --------------------------------------------------------------------------------
    def _microbatches(self, split: str, step: int):
        config, layout = self.config, self.layout
        x, y = self.objective.batch(self.dataset, split, step)
        rows = config.batch_size // layout.dp
        mine = slice(self.mesh.dp_rank * rows, (self.mesh.dp_rank + 1) * rows)
        x, y = x[mine], y[mine]
        per = rows // config.microbatches
        xp = next(iter(self.stages.values())).xp
        return ([xp.asarray(x[k * per:(k + 1) * per]) for k in range(config.microbatches)],
                [xp.asarray(y[k * per:(k + 1) * per]) for k in range(config.microbatches)])

    def train_step(self, step: int) -> dict:
        config, layout = self.config, self.layout
        self.faults.before_step(step)
        start = time.perf_counter()
        inputs, targets = self._microbatches("train", step)
        self.gradients.begin_step()  # zeroes every stage's gradients (views into one flat buffer)
        mixed = self.master is not None
        loss_scale = self.optimizer.scaler.scale if mixed else 1.0
        first_micro = self.mesh.dp_rank * config.microbatches
        seeds = ([dropout_seed(config.seed, step, first_micro + k) for k in range(config.microbatches)]
                 if config.model.dropout > 0 else None)
        with overflow_expected(self.gpt_config.dtype):
            result = run_pipeline_step(self.schedule, self.stages, self.mesh.pp, config.microbatches,
                                       self.num_stages, inputs, targets, dloss=loss_scale / config.microbatches,
                                       dropout_seeds=seeds, tracer=self.tracer, step=step)
        # A non-finite loss or gradient skips the update on every rank alike: the decision is taken
        # on the global norm, which every rank computes the same (a local non-finite loss is folded
        # in as NaN; it also makes that rank's gradients non-finite, and so the dp average everywhere).
        # A mixed run's overflow of the scaled backward folds in as inf and is the loss scaler's.
        loss = float(np.mean(list(result.losses.values()))) if result.losses else None
        poison = loss is not None and not math.isfinite(loss)
        with self.tracer.span("optimizer", step=step):
            lr = lr_at(step, config.lr, config.min_lr, config.warmup, config.steps)
            if layout.zero:
                shards = self.gradients.finish()  # this rank's 1/dp of every bucket, averaged
                self._finalize_grad_shards(shards)
                norm = self._sharded_grad_norm(shards, poison)
                nonfinite = not math.isfinite(norm)
                applied = not nonfinite
                if applied:
                    self.optimizer.update(shards, lr, clip_scale(norm, config.grad_clip))  # then all-gathers
            else:
                grads = self._synchronized_grads()
                overflow = False
                if mixed:  # unscaled into float32 (see model/mixed_precision.py)
                    self._master_grads_flat[...] = self.gradients.flat_grads
                    self._master_grads_flat *= 1.0 / loss_scale
                    grads, overflow = self.master_grads, has_overflow(self.gradients.xp, self._master_grads_flat)
                norm = self._global_grad_norm(grads, poison, overflow=overflow)
                # inf: an overflow on some rank (every rank skips and halves its scale together);
                # nan: a non-finite loss somewhere, the run's fault (skipped or stopped by the driver).
                nonfinite = math.isnan(norm) or (not mixed and not math.isfinite(norm))
                applied = not nonfinite and (self.optimizer.scaler.update(not math.isfinite(norm))
                                             if mixed else True)
                if applied:
                    scale = clip_scale(norm, config.grad_clip)
                    if scale != 1.0:
                        for g in grads.values():
                            g *= scale
                    self.optimizer.update(self.updated, grads, lr)
                    self.gradients.share_tied(self._master_flat if mixed else self.gradients.flat_params)
                    if mixed:
                        self.gradients.flat_params[...] = self._master_flat  # rounded to float16
                    self._refresh_tied_copies()
        extra = {"loss_scale": loss_scale} if mixed else {}
        if mixed and not applied and not nonfinite:
            norm = None  # an overflow's norm means nothing
        return {**extra, "step": step, "loss": loss, "lr": lr, "grad_norm": norm, "skipped": not applied,
                "nonfinite": nonfinite, "rank": self.mesh.rank,
                "peak_in_flight": {str(s): n for s, n in result.peak_in_flight.items()},
                "seconds": time.perf_counter() - start,
                "bytes_sent": int(self.mesh.world.bytes_sent),
                "data_parallel": dict(self.gradients.timings)}

    def _synchronized_grads(self) -> dict:
        """One gradient per parameter name, averaged over data-parallel ranks (bucket all-reduces
        started during the last micro-batch's backward; tied local copies share one view) and the
        tied parameters summed over the tie group; then each stage's own finishing step."""
        grads = self.gradients.finish()
        for stage in self.stages.values():
            stage.finalize_grads()  # sums over tp commute with the dp average, so they may come after
        return grads

    def _finalize_grad_shards(self, shards: list):
        """ZeRO-1's finalize_grads: the tp sums of sequence-parallel gradients, on the pieces of them
        inside this rank's shards (tensor-parallel peers hold the same pieces: same stages,
        same dp rank). Sums over tp commute with the dp average, so after the reduce-scatter is fine."""
        pieces = self._tp_partial_pieces
        if not pieces:
            return
        xp = next(iter(self.stages.values())).xp
        flat = xp.concatenate([shards[b][start:stop] for b, start, stop in pieces])
        self.mesh.tp.all_reduce(flat)
        offset = 0
        for b, start, stop in pieces:
            shards[b][start:stop] = flat[offset:offset + stop - start]
            offset += stop - start

    def _sharded_grad_norm(self, shards: list, poison: bool = False) -> float:
        """ZeRO-1: the true global norm from this rank's averaged shards, summed over dp, tp and the
        pipeline (tied parameters counted once, on the first stage; parameters replicated over tp
        counted on tp rank 0 only)."""
        total = np.array([np.nan if poison else self.gradients.shard_sum_of_squares(shards, self._norm_skip)])
        self._sum_over_axes(total, ["dp"] + [name for name in self._inner_axes() if name != "dp"])
        return float(np.sqrt(total[0]))

    def _inner_axes(self) -> list[str]:
        return [name for name, _ in reversed(self.mesh.axes)]

    def _sum_over_axes(self, total, names):
        """All-reduce `total` over the mesh axes `names`, in that order (an axis of one is skipped)."""
        for name in names:
            if getattr(self.mesh, f"{name}_size") > 1:
                self.mesh.communicators[name].all_reduce(total)

    def _global_grad_norm(self, grads: dict, poison: bool = False, *, overflow: bool = False) -> float:
        """The norm over the whole model: each parameter counted once across the pipeline (the
        tied parameters once, on the first stage) and across tensor-parallel ranks (shards on every tp rank,
        replicated parameters on tp rank 0 only). `poison` (a non-finite local loss) makes it nan on
        every rank, `overflow` (a mixed run's non-finite gradient here) inf unless poisoned."""
        replicated = {name for stage in self.stages.values() for name in stage.replicated_names}
        tied = set(self.plan.tied_params)
        owned = [g for name, g in grads.items() if not (name in tied and 0 not in self.stages)
                 and (name not in replicated or self.mesh.tp_rank == 0)]
        xp = next(iter(self.stages.values())).xp
        total = np.array([np.nan if poison else math.inf if overflow
                          else float(sum(float(xp.vdot(g.ravel(), g.ravel())) for g in owned))])
        # Data-parallel replicas hold the same averaged gradients; every other axis holds other parts.
        self._sum_over_axes(total, [name for name in self._inner_axes() if name != "dp"])
        return float(np.sqrt(total[0]))

    def _refresh_tied_copies(self):
        for stage in self.stages.values():
            for name, param in stage.params.items():
                if self.params[name] is not param:
                    param[...] = self.params[name]

    # ---- evaluation and state ----------------------------------------------------------------------
    def evaluate(self) -> dict:
        """This rank's part of the validation loss (model/training/evaluation.py)."""
        return evaluate_rank(self)

    def generate(self, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, started: float | None = None):
        """Continue `prompts` (token id lists) with the model as trained so far, under the run's layout
        (model/inference/pipelined_generation.py's `generate_on_mesh`). Every rank must be asked."""
        return generate_on_mesh(self.stages, self.mesh, self.num_stages, prompts, max_new_tokens, temperature,
                                top_k, seed, started=started)

    def local_params(self) -> dict:
        """This rank's parameters on the host (float32 master weights when mixed): tensor-parallel shards
        (see `shard_table`), full arrays when tp = 1. `model.parallel.tensor_parallel.assemble_full_params`
        puts them back together."""
        weights = self.params if self.master is None else self.master
        return {name: np.asarray(p.get() if hasattr(p, "get") else p) for name, p in weights.items()}

    def memory_report(self) -> dict:
        """Bytes of weights / gradients / optimizer state / activations this rank holds, and its
        peak and current RSS (see model/training/memory_report.py)."""
        return memory_report(self)

    def shard_table(self) -> dict:
        """{name: {"axis", "parts", "tp_rank", "tp_size", "full_shape"}} of what `local_params` returns."""
        return {name: entry for stage in self.stages.values() for name, entry in stage.shard_table().items()}

    def coordinates(self) -> dict:
        return dict(self.mesh.indices)

    # ---- checkpoints (the family's full names, so a run can resume with any layout) ------------------
    def optimizer_state(self) -> dict:
        """AdamW state of what this rank holds, keyed like `AdamW.state_dict()` ("step", "m.NAME", "v.NAME").
        With ZeRO-1 the moments are all-gathered over dp, so every rank must be asked (collective)."""
        return self.optimizer.state_dict()

    def optimizer_state_bytes(self) -> int:
        """Bytes of AdamW moments this rank keeps (with ZeRO-1 about 1/dp of the unsharded amount)."""
        if self.layout.zero:
            return self.optimizer.moment_bytes
        return int(sum(m.nbytes for m in self.optimizer.m.values()) + sum(v.nbytes for v in self.optimizer.v.values()))

    def save_checkpoint_pieces(self, checkpoint_dir: str) -> dict:
        """Write the pieces of a sharded checkpoint this rank owns; returns their report for the driver
        (model/training/sharded_checkpoint.py). Every rank must be asked."""
        from ringpipe.model.training.sharded_checkpoint import save_rank

        report = save_rank(self, checkpoint_dir)
        self.faults.after_writing_checkpoint()
        return report

    def load_state(self, checkpoint_dir: str) -> int:
        """Take this rank's part of a checkpoint (weights and AdamW moments); returns its step. A sharded
        checkpoint is read slice by slice, a consolidated one (model/training/trainer.py) whole."""
        import json
        import os

        from ringpipe.model.training.sharded_checkpoint import is_sharded, load_rank

        if is_sharded(checkpoint_dir):
            return load_rank(self, checkpoint_dir)
        from ringpipe.model.training.run_dir import OPTIMIZER_FILE, TRAINER_STATE_FILE
        from ringpipe.runtime.files import load_tensors

        saved, full = self.family.load_checkpoint(checkpoint_dir, dtype=weights_dtype(self.config.dtype))
        for field in self.family.architecture_fields:  # (the driver holds no weights to check them against)
            if getattr(saved, field) != getattr(self.gpt_config, field):
                raise ValueError(f"checkpoint {checkpoint_dir} has {field} {getattr(saved, field)}, the run expects "
                                 f"{getattr(self.gpt_config, field)}")
        optimizer_full, _ = load_tensors(os.path.join(checkpoint_dir, OPTIMIZER_FILE))
        # "step", and a mixed run's loss-scaler entries: whole on every rank
        state = {key: value for key, value in optimizer_full.items() if not key.startswith(("m.", "v."))}
        for name, param in self.params.items():
            param[...] = self._shard_of(name, full[name].astype(param.dtype))
            if self.master is not None:
                self.master[name][...] = self.gradients.xp.asarray(self._shard_of(name, full[name]))
            for moment in ("m", "v"):
                state[f"{moment}.{name}"] = self._shard_of(name, optimizer_full[f"{moment}.{name}"])
        self.optimizer.load_state_dict(state)
        self._refresh_tied_copies()
        with open(os.path.join(checkpoint_dir, TRAINER_STATE_FILE)) as f:
            return int(json.load(f)["step"])

    def _shard_of(self, name: str, full_array):
        """The part of a full parameter-shaped array this rank holds (all of it without tp)."""
        for stage in self.stages.values():
            if name in stage.params:
                return stage.take_shard(name, full_array)
        return full_array


def _resolve(reference: str):
    """The object a "package.module:name" reference names."""
    import importlib

    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)

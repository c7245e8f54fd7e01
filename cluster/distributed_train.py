"""The driver of a multi-worker training run.

`DistributedRun` offers the same calls as `model.training.trainer.Trainer` (step, train_step, evaluate,
save_checkpoint, save_model, tokenizer), so `ringpipe train` drives both the same way. Behind them:
local worker processes (`runtime.Cluster`), one `ParallelTrainer` actor per rank, and a driver-side
Trainer that owns the tokenizer and the token file. Checkpoints are sharded: each rank writes the
pieces it owns and the driver commits them (model/training/sharded_checkpoint.py); tensors are stored
under their Hugging Face names with their global shapes, so a run can resume with any layout. The
final model is exported from the last checkpoint by streaming (model/training/hf_export.py).
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from ringpipe.model.families import family, special_ids
from ringpipe.model.nn.mixed_precision import weights_dtype
from ringpipe.model.parallel.tensor_parallel import assemble_full_optimizer_state, assemble_full_params
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.checkpoint_metadata import remove_unfinished
from ringpipe.model.training.hf_export import export_checkpoint
from ringpipe.model.training.run_dir import SCHEDULE_FILE, TOKEN_FILE, find_checkpoint
from ringpipe.model.training.sharded_checkpoint import check_resumable, save_sharded_checkpoint
from ringpipe.model.training.step import NonFiniteError
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime import Cluster
from ringpipe.runtime.files import write_json


class DistributedRun:
    def __init__(self, config: TrainConfig, layout: Layout, out: str, resume: bool = False, trace: bool = False,
                 timeout: float = 120.0, bucket_bytes: int = 1 << 20, say=lambda message: None,
                 cluster_options: dict | None = None, keep_checkpoints: int = 3):
        """`say(message)` is told what each slow stretch of starting up is doing; `cluster_options`
        go to the `Cluster` (a launcher for other hosts and the address to bind, cluster/launchers.py);
        `keep_checkpoints`: how many committed checkpoints stay (older ones go once a newer one is
        committed)."""
        layout.validate(config)  # before anything starts or is written
        self.config, self.layout, self.out, self.trace = config, layout, out, trace
        self.keep_checkpoints, self._saved = keep_checkpoints, (None, None)  # (step, path) of the last save
        remove_unfinished(out)  # what a crashed save left: never visible, now gone
        self.local = (Trainer.resume if resume else Trainer.create)(config, out)
        self.tokenizer = self.local.tokenizer
        self.step = self.local.step
        if resume:  # every piece there, of the right size, for this model: before any worker starts
            check_resumable(find_checkpoint(out), config.model_config(self.tokenizer.vocab_size), family(config.family))
        say(f"starting {layout.world_size} workers")
        self.cluster = Cluster(layout.world_size, threads_per_worker=1, timeout=timeout, **(cluster_options or {}))
        try:
            self.trainers = self.cluster.spawn(ParallelTrainer, dataclasses.asdict(config),
                                               dataclasses.asdict(layout), os.path.join(out, TOKEN_FILE),
                                               self.tokenizer.vocab_size, bucket_bytes,
                                               special_ids=special_ids(self.tokenizer, self.local.family))
            if resume:
                self.trainers.load_state(os.path.abspath(find_checkpoint(out))).result()
            if trace:
                write_json(os.path.join(out, SCHEDULE_FILE),
                           {"schedule": layout.schedule, "pp": layout.pp, "microbatches": config.microbatches,
                            "virtual_stages": layout.virtual_stages, "dp": layout.dp, "tp": layout.tp})
                self.cluster.start_trace()
        except BaseException:
            self.cluster.close()
            raise
        self._pulled_at = None

    def train_step(self, step: int) -> dict:
        start = time.perf_counter()
        per_rank = self.trainers.train_step(step).result()
        elapsed = time.perf_counter() - start
        self.step = step + 1
        losses = [m["loss"] for m in per_rank if m["loss"] is not None]
        tokens = self.config.batch_size * self.config.model.block_size
        metrics = {"step": step, "loss": float(np.mean(losses)), "lr": per_rank[0]["lr"],
                   "grad_norm": per_rank[0]["grad_norm"], "tokens": tokens, "tokens_per_s": tokens / elapsed,
                   "bytes_sent": sum(m["bytes_sent"] for m in per_rank)}
        skipped = {m["skipped"] for m in per_rank}
        if len(skipped) > 1:  # cannot happen: every rank decides on the same global norm
            raise RuntimeError(f"step {step + 1}: ranks disagree on skipping a step "
                               f"({[m['rank'] for m in per_rank if m['skipped']]} skipped)")
        if any(m["nonfinite"] for m in per_rank) and self.config.on_nonfinite == "stop":
            raise NonFiniteError.of_step(step, metrics["loss"], metrics["grad_norm"])
        if "loss_scale" in per_rank[0]:  # mixed precision: an overflow skips, and is no error
            metrics.update(loss_scale=per_rank[0]["loss_scale"], skipped=per_rank[0]["skipped"])
        elif skipped == {True}:
            metrics["skipped"] = True
        return metrics

    def _pull_state(self, with_optimizer: bool):
        """Bring the workers' weights (and optimizer moments) into the driver-side Trainer."""
        if self._pulled_at in ((self.step, with_optimizer), (self.step, True)):
            return  # already here (the optimizer moments pulled for a checkpoint do no harm)
        tables = self.trainers.shard_table().result()
        self.local.load_weights(assemble_full_params(self.trainers.local_params().result(), tables))
        if with_optimizer:
            state = assemble_full_optimizer_state(self.trainers.optimizer_state().result(), tables)
            self.local.optimizer.load_state_dict(state)
        self.local.step = self.step
        self._pulled_at = (self.step, with_optimizer)

    def evaluate(self) -> dict:
        self._pull_state(with_optimizer=False)
        return self.local.evaluate()

    def save_checkpoint(self) -> str:
        """Each rank writes its pieces into RUN/checkpoints/step-N; committed by the driver, which
        holds no weights for it. Returns the directory."""
        model = dataclasses.replace(self.config.model_config(self.tokenizer.vocab_size),
                                    dtype=weights_dtype(self.config.dtype))
        path = save_sharded_checkpoint(self.trainers, self.out, self.step, config=dataclasses.asdict(self.config),
                                       model=model, layout=dataclasses.asdict(self.layout), tokenizer=self.tokenizer,
                                       keep=self.keep_checkpoints)
        self._saved = (self.step, path)
        return path

    def save_model(self) -> None:
        """The Hugging Face model files in the run directory, streamed from this step's checkpoint
        (saved first unless it was just saved)."""
        step, path = self._saved
        export_checkpoint(path if step == self.step else self.save_checkpoint(), self.out)

    @property
    def gpt(self):
        self._pull_state(with_optimizer=False)
        return self.local.gpt

    def close(self) -> list[str]:
        """Stop the workers; with tracing on, first write the traces into the run directory."""
        paths = []
        try:
            if self.trace and self.cluster.failure is None:
                paths = self.cluster.stop_trace(self.out)
        finally:
            self.cluster.close()
        return paths

"""The driver of a multi-worker training run: a coordinator that holds no weights.

`DistributedRun` offers the calls `ringpipe train` drives a single-process `Trainer` with (step,
train_step, evaluate, save_checkpoint, save_model, tokenizer), plus `sample`. Behind them: worker
processes (`runtime.Cluster`), one `ParallelTrainer` actor per rank building its own shards, and a
`RunSetup` (tokenizer, token file, step; no model). Evaluation runs on the workers under the run's
layout. Checkpoints are sharded: each rank writes the pieces it owns and the driver commits them
(model/training/sharded_checkpoint.py); tensors are stored under their Hugging Face names with their
global shapes, so a run can resume with any layout. The final model is exported from the last
checkpoint by streaming (model/training/hf_export.py), and the end-of-training sample is generated
from it by `ringpipe generate` in a child process (until generation is distributed).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import numpy as np

from ringpipe.model.data.tokenizer import encodable
from ringpipe.model.families import family
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.evaluation import mean_validation_loss
from ringpipe.model.training.hf_export import export_checkpoint
from ringpipe.model.training.layout_report import describe_layout
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.run_dir import LOGS_DIR, SCHEDULE_FILE, find_checkpoint
from ringpipe.model.training.run_setup import RunSetup
from ringpipe.model.training.sharded_checkpoint import save_sharded_checkpoint
from ringpipe.model.training.step import NonFiniteError
from ringpipe.runtime import Cluster
from ringpipe.runtime.files import write_json


class DistributedRun:
    def __init__(self, config: TrainConfig, layout: Layout, out: str, resume: bool = False, trace: bool = False,
                 timeout: float = 120.0, bucket_bytes: int = 1 << 20, say=lambda message: None,
                 cluster_options: dict | None = None, keep_checkpoints: int = 3, setup: RunSetup | None = None,
                 workers_started=lambda cluster: None, report=lambda line: None):
        """`say(message)` is told what each slow stretch of starting up is doing; `cluster_options`
        go to the `Cluster` (a launcher for other hosts and the address to bind, cluster/launchers.py);
        `keep_checkpoints`: how many committed checkpoints stay (older ones go once a newer one is
        committed). `setup`: the run's tokenizer, token file and step when made elsewhere (default:
        RunSetup.create/resume, which also check a checkpoint's pieces before any worker starts);
        `workers_started(cluster)` is called once the worker processes run, before they build their
        shards (`ringpipe bench memory` puts them under a memory limit there); `report(line)` is told
        the layout report (the pipeline split, bytes per stage and rank) before the workers start."""
        layout.validate(config)  # before anything starts or is written
        self.config, self.layout, self.out, self.trace = config, layout, out, trace
        self.keep_checkpoints, self._saved = keep_checkpoints, (None, None)  # (step, path) of the last save
        self.setup = setup or (RunSetup.resume if resume else RunSetup.create)(config, out)
        if self.setup.ids is not None:
            self.setup.write_token_file()
        self.tokenizer, self.step = self.setup.tokenizer, self.setup.step
        plan = family(config.family).parallel_plan(config.model_config(self.setup.vocab_size))  # makes no weight
        report(describe_layout(plan, layout, config.dtype))
        say(f"starting {layout.world_size} workers")
        self.cluster = Cluster(layout.world_size, threads_per_worker=1, timeout=timeout,
                               log_dir=os.path.join(os.path.abspath(out), LOGS_DIR), **(cluster_options or {}))
        try:
            workers_started(self.cluster)
            self.trainers = self.cluster.spawn(ParallelTrainer, dataclasses.asdict(config),
                                               dataclasses.asdict(layout), self.setup.token_file,
                                               self.setup.vocab_size, bucket_bytes,
                                               special_ids=self.setup.special_ids)
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

    def evaluate(self) -> dict:
        """{"val_loss"}, computed by the workers under the run's layout (no weights move)."""
        return mean_validation_loss(self.trainers.evaluate().result())

    def save_checkpoint(self) -> str:
        """Each rank writes its pieces into RUN/checkpoints/step-N; committed by the driver, which
        holds no weights for it. Returns the directory."""
        path = save_sharded_checkpoint(self.trainers, self.out, self.step, config=dataclasses.asdict(self.config),
                                       model=self.setup.model_config, layout=dataclasses.asdict(self.layout),
                                       tokenizer=self.tokenizer, keep=self.keep_checkpoints)
        self._saved = (self.step, path)
        return path

    def save_model(self) -> None:
        """The Hugging Face model files in the run directory, streamed from this step's checkpoint
        (saved first unless it was just saved)."""
        step, path = self._saved
        export_checkpoint(path if step == self.step else self.save_checkpoint(), self.out)

    def sample(self, max_new_tokens: int) -> str:
        """Text generated from the saved model (`save_model` first) by `ringpipe generate` in a child
        process, as a single-process run samples its own: prompt "\n" (or token 0), the run's seed.
        RuntimeError with the child's last line if it fails."""
        prompt = "\n" if encodable(self.tokenizer, "\n") else self.tokenizer.decode([0])
        command = [sys.executable, "-m", "ringpipe.cluster", "generate", "--checkpoint", self.out, "--prompt", prompt,
                   "--max-new-tokens", str(max_new_tokens), "--seed", str(self.config.seed),
                   "--device", self.config.device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
            raise RuntimeError(f"sampling from {self.out} with ringpipe generate failed: {lines[-1]}")
        return done.stdout.rstrip("\n")

    def memory_report(self) -> list[dict]:
        """Every rank's `ParallelTrainer.memory_report`, by rank."""
        return self.trainers.memory_report().result()

    def close(self) -> list[str]:
        """Stop the workers; with tracing on, first write the traces into the run directory."""
        paths = []
        try:
            if self.trace and self.cluster.failure is None:
                paths = self.cluster.stop_trace(self.out)
        finally:
            self.cluster.close()
        return paths


"""The single-process training loop as a `Trainer`: data, model, AdamW, checkpoints; no printing.

A run's directory holds `tokens.bin` (the tokenized corpus), `checkpoint/` (the latest resumable
state) and, at the end, the final model (`model.safetensors`, `config.json`, `tokenizer.json`).

Randomness is a pure function of (seed, step): batches come from `TokenDataset.get_batch` and the
dropout seed of each micro-batch from `dropout_seed`, so the checkpointed "RNG state" is just the
seed and the step, and a resumed run repeats an uninterrupted one bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file

from model.data import SAMPLERS, TokenDataset, load_corpus, write_token_file
from model.gpt import GPT, GPTConfig
from model.ops import cross_entropy_forward
from model.optim import AdamW, clip_grad_norm, lr_at
from model.tokenizer import load_tokenizer, make_tokenizer
from runtime.backend import array_module, to_host

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TOKEN_FILE = "tokens.bin"


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; saved in each checkpoint. `batch_size` is the global batch
    in sequences, split into `microbatches` equal parts for gradient accumulation."""
    data: str | None = None  # FILE, DIR or GLOB; None = the standard-library corpus
    tokenizer: str = "char"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    microbatches: int = 1
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    dropout: float = 0.0
    dtype: str = "float32"
    seed: int = 0
    val_fraction: float = 0.1
    sampler: str = "epoch"  # train batches: "epoch" (shuffled epochs) or "random" (random offsets)
    eval_every: int = 250
    eval_iters: int = 50  # val batches per evaluation; 20 left a noise of ~0.01 in the loss
    checkpoint_every: int = 500
    device: str = "cpu"

    def validate(self) -> None:
        """ValueError naming the first setting that cannot work."""
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "microbatches",
                     "steps", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.microbatches:
            raise ValueError(f"batch size {self.batch_size} is not divisible by "
                             f"microbatches {self.microbatches}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if self.warmup < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup, eval_every and checkpoint_every must not be negative")

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         block_size=self.block_size, vocab_size=vocab_size, dropout=self.dropout,
                         dtype=self.dtype, device=self.device)


def threads_for(config: TrainConfig) -> int:
    """Batch shards run on this many threads: all the cores this process may use. Not with dropout,
    whose masks are drawn per shard: the run would differ from the same model split over workers."""
    if config.dropout > 0:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def dropout_seed(seed: int, step: int, microbatch: int) -> int:
    """The dropout seed of one micro-batch: a function of (seed, step, microbatch) only."""
    return int(np.random.default_rng([seed, step, 2, microbatch]).integers(2**31))


def _tokenize_corpus(config: TrainConfig, tokenizer=None):
    """(tokenizer, ids) for the corpus; a given tokenizer (from a checkpoint) must cover it."""
    text = load_corpus(config.data)
    if tokenizer is None:
        tokenizer = make_tokenizer(config.tokenizer, text)
        ids = tokenizer.encode(text)
    else:
        try:
            ids = tokenizer.encode(text)
        except ValueError as exc:
            raise ValueError(f"the data does not fit the checkpoint's tokenizer: {exc}") from None
    TokenDataset(ids, config.val_fraction).check_block_size(config.block_size)
    return tokenizer, ids


class Trainer:
    """Model, optimizer and data of one run; `train_step` and `evaluate` return metrics dicts."""

    def __init__(self, config: TrainConfig, run_dir: str, gpt, optimizer, tokenizer, dataset,
                 step: int = 0):
        self.config, self.run_dir = config, run_dir
        self.gpt, self.optimizer, self.tokenizer, self.dataset = gpt, optimizer, tokenizer, dataset
        self.step = step  # steps completed = the next step to run
        self.xp = array_module(config.device)

    @classmethod
    def create(cls, config: TrainConfig, run_dir: str) -> "Trainer":
        """A fresh run: everything is validated before anything is written to `run_dir`."""
        config.validate()
        tokenizer, ids = _tokenize_corpus(config)
        gpt = GPT(config.gpt_config(tokenizer.vocab_size), seed=config.seed, threads=threads_for(config))
        optimizer = AdamW(gpt.params, (config.beta1, config.beta2), config.eps,
                          config.weight_decay)
        return cls(config, run_dir, gpt, optimizer, tokenizer, _token_dataset(config, ids, run_dir))

    @classmethod
    def resume(cls, config: TrainConfig, run_dir: str) -> "Trainer":
        """Continue the run saved in `run_dir/checkpoint` under `config` (usually the saved one,
        see `saved_config`); ValueError if the checkpoint is missing, corrupt or mismatched."""
        config.validate()
        checkpoint = find_checkpoint(run_dir)
        state = _read_trainer_state(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
        if tokenizer.type != config.tokenizer:
            raise ValueError(f"tokenizer {config.tokenizer!r} differs from the checkpoint's "
                             f"{tokenizer.type!r} in {checkpoint}")
        _, ids = _tokenize_corpus(config, tokenizer)
        try:
            saved = GPT.from_pretrained(checkpoint, dtype=config.dtype, device=config.device)
            optimizer_state = load_file(os.path.join(checkpoint, OPTIMIZER_FILE))
        except Exception as exc:  # any reader error means the same thing to the user
            raise ValueError(f"corrupt checkpoint {checkpoint}: {exc}") from None
        # The run's config is the authority (e.g. dropout); the saved shapes must agree with it.
        gpt_config = config.gpt_config(tokenizer.vocab_size)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(saved.config, name) != getattr(gpt_config, name):
                raise ValueError(f"checkpoint {checkpoint} has {name} "
                                 f"{getattr(saved.config, name)}, the run expects "
                                 f"{getattr(gpt_config, name)}")
        gpt = GPT(gpt_config, params=saved.params, threads=threads_for(config))
        optimizer = AdamW(gpt.params, (config.beta1, config.beta2), config.eps,
                          config.weight_decay)
        optimizer.load_state_dict(optimizer_state)
        return cls(config, run_dir, gpt, optimizer, tokenizer,
                   _token_dataset(config, ids, run_dir), step=state["step"])

    def train_step(self, step: int) -> dict:
        """One optimizer step on the global batch of `step`, accumulated over micro-batches.

        Returns {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}.
        """
        config, xp = self.config, self.xp
        start = time.perf_counter()
        x, y = self.dataset.get_batch("train", step, config.batch_size, config.block_size,
                                      config.seed, config.sampler)
        rows = config.batch_size // config.microbatches
        total_loss, grads = 0.0, None
        for micro in range(config.microbatches):
            rows_of = slice(micro * rows, (micro + 1) * rows)
            seed = dropout_seed(config.seed, step, micro) if config.dropout > 0 else None
            loss, micro_grads = self.gpt.loss_and_grads(xp.asarray(x[rows_of]),
                                                        xp.asarray(y[rows_of]), dropout_seed=seed)
            total_loss += loss
            if grads is None:
                grads = micro_grads
            else:
                for name, g in micro_grads.items():
                    grads[name] += g
        if config.microbatches > 1:
            # Equal-sized micro-batches: the mean of their mean losses is the big batch's mean.
            for g in grads.values():
                g *= 1.0 / config.microbatches
        grad_norm = clip_grad_norm(grads, config.grad_clip)
        lr = lr_at(step, config.lr, config.min_lr, config.warmup, config.steps)
        self.optimizer.update(self.gpt.params, grads, lr)
        self.step = step + 1
        elapsed = time.perf_counter() - start
        tokens = config.batch_size * config.block_size
        return {"step": step, "loss": total_loss / config.microbatches, "lr": lr,
                "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / elapsed}

    def evaluate(self) -> dict:
        """Mean loss over the same `eval_iters` val batches every time: {"val_loss"}."""
        config, xp = self.config, self.xp
        rows = config.batch_size // config.microbatches
        losses = []
        for i in range(config.eval_iters):
            x, y = self.dataset.get_batch("val", i, config.batch_size, config.block_size,
                                          config.seed, config.sampler)
            for start in range(0, config.batch_size, rows):
                logits = self.gpt.forward(xp.asarray(x[start:start + rows]))
                loss, _ = cross_entropy_forward(logits, xp.asarray(y[start:start + rows]),
                                                overwrite_logits=True)
                losses.append(loss)
        return {"val_loss": float(np.mean(losses))}

    def save_checkpoint(self) -> str:
        """Write `run_dir/checkpoint` atomically; returns its path.

        The new checkpoint is written into a temporary directory beside it and swapped in by
        renames, so a crash leaves either the old or the new checkpoint, never a mixture.
        """
        os.makedirs(self.run_dir, exist_ok=True)
        final = os.path.join(self.run_dir, CHECKPOINT_DIR)
        previous = final + ".old"
        tmp = tempfile.mkdtemp(prefix=CHECKPOINT_DIR + ".tmp-", dir=self.run_dir)
        try:
            self.gpt.save_pretrained(tmp, tokenizer=self.tokenizer)
            save_file(self.optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
            with open(os.path.join(tmp, TRAINER_STATE_FILE), "w") as f:
                json.dump({"step": self.step, "config": dataclasses.asdict(self.config)}, f,
                          indent=1)
            if os.path.isdir(final):
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(final, previous)  # `find_checkpoint` falls back to it until the swap
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(previous, ignore_errors=True)
        return final

    def save_model(self) -> None:
        """Write the final model (weights, config.json, tokenizer.json) into `run_dir`; each
        file is written beside its target and renamed over it."""
        tmp = tempfile.mkdtemp(prefix="model.tmp-", dir=self.run_dir)
        try:
            self.gpt.save_pretrained(tmp, tokenizer=self.tokenizer)
            for name in sorted(os.listdir(tmp)):
                os.replace(os.path.join(tmp, name), os.path.join(self.run_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def params_on_host(self) -> dict:
        return {name: to_host(p) for name, p in self.gpt.params.items()}


def _token_dataset(config: TrainConfig, ids, run_dir: str) -> TokenDataset:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, TOKEN_FILE)
    write_token_file(ids, path)
    return TokenDataset.from_file(path, config.val_fraction)


def find_checkpoint(run_dir: str) -> str:
    """The checkpoint directory of a run (the previous one if a swap was interrupted)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
            return path
    raise ValueError(f"no checkpoint in {run_dir} (expected {run_dir}/{CHECKPOINT_DIR}/"
                     f"{TRAINER_STATE_FILE})")


def _read_trainer_state(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
        # Checkpoints written before the epoch sampler existed drew random windows; keep doing so.
        state["config"] = TrainConfig(**{"sampler": "random", **state["config"]})
        state["step"] = int(state["step"])
        return state
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"corrupt checkpoint file {path}: {exc}") from None


def saved_config(run_dir: str) -> TrainConfig:
    """The TrainConfig stored in the run's checkpoint."""
    return _read_trainer_state(find_checkpoint(run_dir))["config"]


def saved_step(run_dir: str) -> int:
    """Steps completed by the run's checkpoint (ValueError if there is none)."""
    return _read_trainer_state(find_checkpoint(run_dir))["step"]

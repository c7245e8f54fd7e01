"""Quality of a full training run: val loss at the last step, ringpipe against PyTorch.

For each seed and train-batch sampler, `model.training.trainer.Trainer` runs the recipe (TrainConfig's
defaults: the tinyshakespeare recipe of the model issue). When torch and transformers import,
transformers' GPT2LMHeadModel then starts from the same initial weights and trains on the same
batches with torch.optim.AdamW, the same learning-rate schedule, weight-decay groups and clipping.
Both are scored on the same windows: `eval_iters` random val batches (the number `ringpipe train`
reports) and every back-to-back window of the val split (the steadier number).
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import numpy as np

from ringpipe.model.nn.ops import cross_entropy_forward
from ringpipe.model.nn.optim import decays, lr_at
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.trainer import Trainer


def val_windows(trainer: Trainer):
    """(x, y) of every back-to-back block_size window of the val split, as int64 arrays."""
    val = trainer.dataset.splits["val"]
    block = trainer.config.model.block_size
    count = (len(val) - 1) // block
    x = np.asarray(val[:count * block], dtype=np.int64).reshape(count, block)
    y = np.asarray(val[1:count * block + 1], dtype=np.int64).reshape(count, block)
    return x, y


def mean_loss(loss_of, batches) -> float:
    """Token-weighted mean of loss_of(x, y) over (x, y) batches."""
    total = count = 0
    for x, y in batches:
        total += loss_of(x, y) * x.size
        count += x.size
    return total / count


def chunks(x, y, rows: int = 64):
    return [(x[i:i + rows], y[i:i + rows]) for i in range(0, len(x), rows)]


def val_batches(trainer: Trainer):
    c = trainer.config
    return [trainer.dataset.get_batch("val", i, c.batch_size, c.model.block_size, c.seed, c.sampler)
            for i in range(c.eval_iters)]


def train_ringpipe(config: TrainConfig, run_dir: str):
    """-> (trainer after config.steps steps, result row)."""
    trainer = Trainer.create(config, run_dir)
    initial = {name: p.copy() for name, p in trainer.params_on_host().items()}  # updated in place
    losses = []
    start = time.perf_counter()
    for step in range(config.steps):
        losses.append(trainer.train_step(step)["loss"])
    wall = time.perf_counter() - start
    gpt, xp = trainer.gpt, trainer.xp

    def loss_of(x, y):
        logits = gpt.forward(xp.asarray(x))
        return float(cross_entropy_forward(logits, xp.asarray(y), overwrite_logits=True)[0])

    row = {"val_loss": mean_loss(loss_of, val_batches(trainer)),
           "val_loss_whole_split": mean_loss(loss_of, chunks(*val_windows(trainer))),
           "train_loss_last_100": float(np.mean(losses[-100:])), "wall_s": wall}
    return trainer, initial, row


def train_pytorch(trainer: Trainer, initial: dict, threads: int):
    """The same run in transformers' GPT2LMHeadModel (float32 or float64 like the config), from
    `initial` weights, on the trainer's batches; -> result row, or None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(threads)
    c, g = trainer.config, trainer.gpt.config
    hf_config = transformers.GPT2Config(
        n_layer=g.n_layer, n_head=g.n_head, n_embd=g.n_embd, n_positions=g.block_size,
        vocab_size=g.vocab_size, resid_pdrop=c.model.dropout, embd_pdrop=c.model.dropout, attn_pdrop=c.model.dropout,
        layer_norm_epsilon=1e-5, activation_function="gelu_new", bos_token_id=None, eos_token_id=None)
    torch.manual_seed(c.seed)
    model = transformers.GPT2LMHeadModel(hf_config).to(getattr(torch, c.dtype))
    state = {"transformer." + name: torch.from_numpy(np.array(p)) for name, p in initial.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    named = dict(model.named_parameters())  # the tied lm_head appears once, as transformer.wte
    decay = [p for p in named.values() if decays(p)]
    no_decay = [p for p in named.values() if not decays(p)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)

    def loss_of(x, y):
        logits = model(torch.from_numpy(x)).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(y).reshape(-1))

    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(c.steps):
        x, y = trainer.dataset.get_batch("train", step, c.batch_size, c.model.block_size, c.seed, c.sampler)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, c.lr, c.min_lr, c.warmup, c.steps)
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        def eval_loss(x, y):
            return loss_of(x, y).item()
        return {"val_loss": mean_loss(eval_loss, val_batches(trainer)),
                "val_loss_whole_split": mean_loss(eval_loss, chunks(*val_windows(trainer))),
                "train_loss_last_100": float(np.mean(losses[-100:])), "wall_s": wall}


def run(data=None, seeds=(0,), samplers=("epoch",), steps=None, eval_iters=200, threads=2,
        compare=True) -> dict:
    """Train every (sampler, seed) in both implementations; returns {"recipe", "rows", "means"}."""
    base = TrainConfig(data=data, eval_iters=eval_iters)
    if steps is not None:
        base.steps = steps
    for sampler in samplers:  # every setting checked before the first (long) run starts
        dataclasses.replace(base, sampler=sampler).validate()
    rows = []
    for sampler in samplers:
        for seed in seeds:
            config = dataclasses.replace(base, seed=seed, sampler=sampler)
            with tempfile.TemporaryDirectory(prefix="ringpipe-quality-") as run_dir:
                trainer, initial, row = train_ringpipe(config, run_dir)
                rows.append({"implementation": "ringpipe", "sampler": sampler, "seed": seed, **row})
                if compare:
                    row = train_pytorch(trainer, initial, threads)
                    if row is not None:
                        rows.append({"implementation": "pytorch", "sampler": sampler, "seed": seed,
                                     **row})
    means = {}
    for row in rows:
        key = f"{row['implementation']}/{row['sampler']}"
        means.setdefault(key, []).append(row)
    means = {key: {name: statistics.mean(r[name] for r in group)
                   for name in ("val_loss", "val_loss_whole_split", "wall_s")}
             for key, group in means.items()}
    recipe = base.flat()
    recipe.pop("seed"), recipe.pop("sampler")
    return {"recipe": recipe, "threads": threads, "rows": rows, "means": means}


def format_table(result: dict) -> str:
    r = result["recipe"]
    lines = [f"# {r['n_layer']} layers x {r['n_embd']} wide, block {r['block_size']}, batch "
             f"{r['batch_size']}, {r['steps']} steps, lr {r['lr']:g}->{r['min_lr']:g}, "
             f"data {r['data'] or 'stdlib source'}; val = mean of {r['eval_iters']} random val "
             f"batches, whole = every window of the val split",
             f"{'implementation':<16}{'sampler':<9}{'seed':>5}{'val':>9}{'whole':>9}"
             f"{'train':>9}{'wall s':>9}"]
    for row in result["rows"]:
        lines.append(f"{row['implementation']:<16}{row['sampler']:<9}{row['seed']:>5}"
                     f"{row['val_loss']:>9.4f}{row['val_loss_whole_split']:>9.4f}"
                     f"{row['train_loss_last_100']:>9.4f}{row['wall_s']:>9.1f}")
    for key, mean in result["means"].items():
        implementation, sampler = key.split("/")
        lines.append(f"{implementation:<16}{sampler:<9}{'mean':>5}{mean['val_loss']:>9.4f}"
                     f"{mean['val_loss_whole_split']:>9.4f}{'':>9}{mean['wall_s']:>9.1f}")
    if not any(row["implementation"] == "pytorch" for row in result["rows"]):
        lines.append("PyTorch comparison skipped (--no-compare, or torch/transformers missing)")
    return "\n".join(lines)

"""Training-step throughput of the dense GPT, against the same model in PyTorch/transformers.

One step = forward + backward + AdamW update on a (batch_size, block_size) batch of random
tokens. When torch and transformers import, `GPT2LMHeadModel` with the same weights, the same
batches and the same thread count is timed with `torch.optim.AdamW` in the same process.
Also reports the peak of cached activations with and without recompute at block size 256.
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from ringpipe.model.nn import kernels
from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.nn.optim import AdamW

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1
MEMORY_BLOCK_SIZE = 256


def random_batches(config: GPTConfig, batch_size: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, config.vocab_size, (batch_size, config.block_size)),
             rng.integers(0, config.vocab_size, (batch_size, config.block_size)))
            for _ in range(count)]


def time_interleaved(steps: dict, batches, warmup: int, round_steps: int = 5) -> dict:
    """Seconds per call of each step(idx, targets) in `steps` (name -> function).

    After `warmup` untimed calls each, the implementations take turns in rounds of
    `round_steps` steps on the same batches, so a busy neighbour on a shared machine slows
    both alike instead of whichever happened to run then.
    """
    for step in steps.values():
        for idx, targets in batches[:warmup]:
            step(idx, targets)
    times = {name: [] for name in steps}
    timed = batches[warmup:]
    for start in range(0, len(timed), round_steps):
        for name, step in steps.items():
            for idx, targets in timed[start:start + round_steps]:
                begin = time.perf_counter()
                step(idx, targets)
                times[name].append(time.perf_counter() - begin)
    return times


class ThreadedAdamW:
    """model.nn.optim.AdamW with the parameters dealt into `threads` groups of about equal size,
    updated at once on threads (NumPy releases the GIL inside each elementwise pass), as
    torch's AdamW spreads its elementwise work over its intra-op threads."""

    def __init__(self, params: dict, threads: int):
        groups = [[] for _ in range(threads)]
        sizes = [0] * threads
        for name in sorted(params, key=lambda n: -params[n].size):
            k = sizes.index(min(sizes))
            groups[k].append(name)
            sizes[k] += params[name].size
        self.groups = [g for g in groups if g]
        self.optimizers = [AdamW({n: params[n] for n in g}, BETAS, EPS, WEIGHT_DECAY)
                           for g in self.groups]
        self.pool = ThreadPoolExecutor(len(self.groups) - 1) if len(self.groups) > 1 else None

    def update(self, params: dict, grads: dict, lr: float) -> None:
        jobs = [(opt, {n: params[n] for n in g}) for opt, g in zip(self.optimizers, self.groups)]
        futures = [self.pool.submit(opt.update, group, grads, lr) for opt, group in jobs[1:]]
        jobs[0][0].update(jobs[0][1], grads, lr)
        for future in futures:
            future.result()


def ringpipe_step(gpt: GPT):
    """-> (step(idx, targets), losses list): loss_and_grads + AdamW update.

    With batch shards on threads the gradients come back laid out like the parameters, and
    AdamW splits its flat update over the threads itself; otherwise ThreadedAdamW.
    """
    if gpt.threads > 1 and gpt.xp is np:
        optimizer = AdamW(gpt.params, BETAS, EPS, WEIGHT_DECAY, threads=gpt.threads)
    else:
        optimizer = ThreadedAdamW(gpt.params, gpt.threads)
    losses = []

    def step(idx, targets):
        loss, grads = gpt.loss_and_grads(idx, targets)
        optimizer.update(gpt.params, grads, LR)
        losses.append(loss)

    return step, losses


def pytorch_step(gpt: GPT, threads: int):
    """-> (step, losses) for the same model as transformers' GPT2LMHeadModel trained with
    torch.optim.AdamW, or None when torch/transformers are missing."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.set_num_threads(threads)
    c = gpt.config
    hf = transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                 n_positions=c.block_size, vocab_size=c.vocab_size,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hf).to(getattr(torch, c.dtype))
    state = {"transformer." + name: torch.from_numpy(np.array(p)) for name, p in gpt.params.items()}
    model.load_state_dict(state, strict=False)  # lm_head is tied to transformer.wte
    model.train()
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, eps=EPS)
    losses = []

    def step(idx, targets):
        logits = model(torch.from_numpy(idx)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(targets).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    return step, losses


def activation_memory(config: GPTConfig, batch_size: int) -> dict:
    """Peak cached-activation bytes of one loss_and_grads at block size 256, without/with
    recompute."""
    peaks = {}
    for recompute in (False, True):
        gpt = GPT(GPTConfig(**{**config.to_dict(), "block_size": MEMORY_BLOCK_SIZE,
                               "recompute": recompute}))
        idx, targets = random_batches(gpt.config, batch_size, 1)[0]
        gpt.loss_and_grads(idx, targets)
        peaks["recompute" if recompute else "no_recompute"] = gpt.memory.peak_bytes
    return peaks


def run(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65,
        steps=30, warmup=3, threads=2, dtype="float32", compare=True, memory=True) -> dict:
    """Times both implementations; returns a result dict (see `format_table`)."""
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                       vocab_size=vocab_size, dtype=dtype)
    batches = random_batches(config, batch_size, warmup + steps)
    tokens = batch_size * block_size
    result = {"config": config.to_dict(), "batch_size": batch_size, "threads": threads,
              "steps": steps, "tokens_per_step": tokens, "kernels": kernels.status()}
    with threadpool_limits(limits=threads):
        steps = {"ringpipe": ringpipe_step(GPT(config, seed=0, threads=threads))}
        torch_step = pytorch_step(GPT(config, seed=0), threads) if compare else None
        if torch_step is not None:
            steps["pytorch"] = torch_step
        times = time_interleaved({name: s[0] for name, s in steps.items()}, batches, warmup)
        for name, (_, losses) in steps.items():
            result[name] = summarize(times[name], tokens, losses)
        if "pytorch" in result:
            result["speedup"] = (result["ringpipe"]["tokens_per_s"]
                                 / result["pytorch"]["tokens_per_s"])
        if memory:
            result["activation_memory_bytes"] = activation_memory(config, batch_size)
    return result


def summarize(times, tokens, losses) -> dict:
    median = statistics.median(times)
    return {"ms_per_step": 1e3 * median, "ms_per_step_min": 1e3 * min(times),
            "tokens_per_s": tokens / median, "first_loss": losses[0], "last_loss": losses[-1],
            "step_ms": [round(1e3 * t, 2) for t in times]}


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"# GPT n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
             f"block_size={c['block_size']} vocab={c['vocab_size']} batch={result['batch_size']} "
             f"{c['dtype']} threads={result['threads']} steps={result['steps']} (median)",
             f"{'implementation':<28}{'ms/step':>10}{'min ms':>10}{'tokens/s':>12}"
             f"{'loss first→last':>20}"]
    ours = "NumPy + C kernels" if result.get("kernels") == "c" else "NumPy"
    for key, label in (("ringpipe", f"ringpipe ({ours})"),
                       ("pytorch", "PyTorch GPT2LMHeadModel")):
        if key in result:
            r = result[key]
            lines.append(f"{label:<28}{r['ms_per_step']:>10.2f}{r['ms_per_step_min']:>10.2f}"
                         f"{r['tokens_per_s']:>12.0f}"
                         f"{r['first_loss']:>10.4f} → {r['last_loss']:.4f}")
    if "speedup" in result:
        lines.append(f"ringpipe / PyTorch tokens/s: {result['speedup']:.2f}x")
    else:
        lines.append("PyTorch comparison skipped (--no-compare, or torch/transformers missing)")
    if result.get("kernels", "c") != "c":
        lines.append(f"ringpipe ops ran on {result['kernels']}")
    if "activation_memory_bytes" in result:
        m = result["activation_memory_bytes"]
        lines.append(f"peak cached activations at block_size {MEMORY_BLOCK_SIZE}, batch "
                     f"{result['batch_size']}: {m['no_recompute'] / 2**20:.1f} MiB, with recompute "
                     f"{m['recompute'] / 2**20:.1f} MiB "
                     f"({m['no_recompute'] / m['recompute']:.1f}x lower)")
    return "\n".join(lines)

"""One training step of a GPT-2 124M-shaped model: ringpipe against Hugging Face's GPT2LMHeadModel.

    ringpipe bench gpu-step --json out.json                 (12 layers, 12 heads, 768 wide,
                                                              block 1024, vocab 50257, batch 8)
    ringpipe bench gpu-step --device cpu --n-layer 1 ...    (a tiny shape: the CPU smoke test)

Both run the same step on the same synthetic batches: forward, backward, AdamW (decay on 2-D
weights) — ringpipe through `model.training.trainer.Trainer.train_step` itself, so float32 and fp16-mixed
(master weights, loss scaling) are exactly what `ringpipe train` runs; PyTorch in eager mode
(`attn_implementation="eager"`), with `torch.autocast(float16)` and a GradScaler for mixed
precision. TF32 is off for both unless `--tf32` (CuPy: CUPY_TF32=1, read when CuPy starts; torch:
`allow_tf32`), so the two always use the same matmul precision.

Reported per implementation and dtype: the median seconds of `steps` timed steps after `warmup`,
tokens/s, and the model FLOPs utilisation: (6 N + 12 L C T) FLOPs per token (N parameters without
the position embedding, L layers, C width, T block size: PaLM's count, attention included) times
tokens/s, over the dtype's dense peak for the GPU (`PEAK_TFLOPS`, or --peak-tflops).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

# Dense (not sparse) peaks in TFLOP/s from NVIDIA's data sheets: float32 on CUDA cores, TF32 and
# float16 on tensor cores. Looked up by a substring of the device name.
PEAK_TFLOPS = {
    "H200": {"float32": 67.0, "tf32": 494.7, "fp16-mixed": 989.4},
    "H100": {"float32": 67.0, "tf32": 494.7, "fp16-mixed": 989.4},
    "A100": {"float32": 19.5, "tf32": 156.0, "fp16-mixed": 312.0},
}
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch_size=8)


class SyntheticTokens:
    """`TokenDataset.get_batch`'s interface over uniformly random tokens, a fixed batch per step."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_batch(self, split, step, batch_size, block_size, seed, sampler):
        rng = np.random.default_rng([seed, step])
        tokens = rng.integers(0, self.vocab_size, (batch_size, block_size + 1))
        return tokens[:, :-1], tokens[:, 1:]


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> int:
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def _median_step_seconds(step, steps: int, warmup: int, synchronize) -> tuple[float, list]:
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step(i))
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), losses


def ringpipe_run(shape: dict, dtype: str, device: str, steps: int, warmup: int) -> dict:
    from ringpipe.model.gpt2.config import init_params
    from ringpipe.model.gpt2.model import GPT
    from ringpipe.model.training.config import TrainConfig
    from ringpipe.model.training.trainer import Trainer, _master_weights, _optimizer

    config = TrainConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                         block_size=shape["block_size"], batch_size=shape["batch_size"], steps=steps + warmup,
                         dtype=dtype, device=device, warmup=0, lr=1e-4, min_lr=1e-4)
    config.validate()
    gpt_config = config.gpt_config(shape["vocab_size"])
    gpt = GPT(gpt_config, seed=0, threads=1)
    master = _master_weights(config, gpt_config, init_params(gpt_config, 0)) if "mixed" in dtype else None
    optimizer = _optimizer(config, (gpt if master is None else master).params)
    trainer = Trainer(config, run_dir=None, gpt=gpt, optimizer=optimizer, tokenizer=None,
                      dataset=SyntheticTokens(shape["vocab_size"]), master=master)
    synchronize = _synchronizer(device)
    seconds, losses = _median_step_seconds(lambda i: trainer.train_step(i)["loss"], steps, warmup, synchronize)
    n_params = sum(p.size for name, p in gpt.params.items() if name != "wpe.weight")
    return _result(seconds, losses, shape, n_params)


def _synchronizer(device: str):
    if device == "gpu":
        import cupy

        return cupy.cuda.get_current_stream().synchronize
    return lambda: None


def pytorch_run(shape: dict, dtype: str, device: str, steps: int, warmup: int, tf32: bool) -> dict:
    """GPT2LMHeadModel in eager mode; {"skipped": reason} when torch, transformers or CUDA is missing."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        return {"skipped": f"torch/transformers not installed ({exc.name})"}
    target = "cuda" if device == "gpu" else "cpu"
    if target == "cuda" and not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA device (a CPU-only torch build?)"}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    hf = transformers.GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                 n_positions=shape["block_size"], vocab_size=shape["vocab_size"],
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                 eos_token_id=None, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(hf).to(target).train()
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, not eager")
    decay = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    mixed = "mixed" in dtype
    scaler = torch.amp.GradScaler(target, enabled=mixed)
    data = SyntheticTokens(shape["vocab_size"])

    def step(i):
        x, y = data.get_batch("train", i, shape["batch_size"], shape["block_size"], 0, None)
        x, y = torch.from_numpy(x).to(target), torch.from_numpy(y).to(target)
        with torch.autocast(target, dtype=torch.float16, enabled=mixed):
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    synchronize = torch.cuda.synchronize if target == "cuda" else (lambda: None)
    seconds, losses = _median_step_seconds(step, steps, warmup, synchronize)
    n_params = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    return _result(seconds, losses, shape, n_params)


def _result(seconds: float, losses: list, shape: dict, n_params: int) -> dict:
    tokens = shape["batch_size"] * shape["block_size"]
    flops = flops_per_token(n_params, shape["n_layer"], shape["n_embd"], shape["block_size"])
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "model_tflops": flops * tokens / seconds / 1e12,
            "first_loss": losses[0], "last_loss": losses[-1], "parameters": int(n_params)}


def device_name(device: str) -> str:
    if device == "gpu":
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    return "cpu"


def peak_tflops(name: str, dtype: str, tf32: bool, override: float | None) -> float | None:
    if override:
        return override
    key = "tf32" if dtype == "float32" and tf32 else dtype
    for model, peaks in PEAK_TFLOPS.items():
        if model in name:
            return peaks.get(key)
    return None


def run(dtypes=("float32", "fp16-mixed"), device: str = "gpu", steps: int = 10, warmup: int = 3, tf32: bool = False,
        compare: bool = True, peak: float | None = None, **shape) -> dict:
    """Both implementations for each dtype; the result dict `format_table` prints."""
    shape = {**GPT2_124M, **shape}
    if tf32 and device == "gpu" and os.environ.get("CUPY_TF32") != "1":
        raise ValueError("--tf32 needs CUPY_TF32=1 in the environment before CuPy starts (CuPy reads it once)")
    name = device_name(device)
    result = {"shape": shape, "device": name, "steps": steps, "warmup": warmup, "tf32": tf32, "rows": []}
    for dtype in dtypes:
        rows = {"ringpipe": ringpipe_run(shape, dtype, device, steps, warmup)}
        rows["pytorch_eager"] = (pytorch_run(shape, dtype, device, steps, warmup, tf32) if compare
                                 else {"skipped": "--no-compare"})
        top = peak_tflops(name, dtype, tf32, peak)
        for implementation, row in rows.items():
            if "skipped" not in row:
                row["mfu"] = row["model_tflops"] / top if top else None
            result["rows"].append({"implementation": implementation, "dtype": dtype, "peak_tflops": top, **row})
        if "skipped" not in rows["pytorch_eager"]:
            result["rows"][-2]["vs_pytorch"] = rows["ringpipe"]["tokens_per_s"] / rows["pytorch_eager"]["tokens_per_s"]
    return result


def format_table(result: dict) -> str:
    s = result["shape"]
    lines = [f"# GPT-2 shape L={s['n_layer']} H={s['n_head']} C={s['n_embd']} T={s['block_size']} "
             f"V={s['vocab_size']} batch={s['batch_size']} on {result['device']}, median of {result['steps']} "
             f"steps after {result['warmup']}, TF32 {'on' if result['tf32'] else 'off'}",
             f"{'implementation':<16}{'dtype':<12}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'vs PyTorch':>12}"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"{row['implementation']:<16}{row['dtype']:<12}skipped: {row['skipped']}")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
        vs = f"{row['vs_pytorch']:.2f}x" if "vs_pytorch" in row else ""
        lines.append(f"{row['implementation']:<16}{row['dtype']:<12}{1e3 * row['seconds_per_step']:>10.1f}"
                     f"{row['tokens_per_s']:>12.0f}{mfu:>8}{vs:>12}")
    return "\n".join(lines)

"""int8 weights against float32 on a trained run: weight bytes, validation perplexity, generation speed.

    ringpipe bench int8 RUN_DIR [--outlier-threshold 6] [--json PATH]

The run's float32 model and, quantized in memory from it (model/quantization/int8.py), int8 with one
absmax scale per output channel, int8 with one scale per tensor (what per-channel must beat) and,
with --outlier-threshold, per-channel with LLM.int8()'s outlier rows in float. Every variant is
scored on the same windows: every back-to-back block_size window of the run's val split (or the
first --max-windows), perplexity = exp(token-mean cross-entropy). Generation: greedy decoding with
the KV cache from a val-split prompt, float32 and int8 interleaved round by round (the machine is
shared: medians of the rounds, never one timing).
"""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.nn.ops import cross_entropy_forward
from ringpipe.model.quantization.gpt2_int8 import Int8GPT, linear_weight_names
from ringpipe.model.quantization.int8 import quantize_int8
from ringpipe.model.quantization.outliers import outlier_features
from ringpipe.model.quantization.quantize import calibration_inputs, check_int8_family, model_directory
from ringpipe.model.training.run_dir import TOKEN_FILE, saved_config


def val_windows(run_dir: str, block_size: int, max_windows: int | None):
    """(x, y) int64 (N, block_size): back-to-back windows of the run's val split."""
    path = os.path.join(run_dir, TOKEN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"bench int8 scores the run's val split, and {path} does not exist")
    try:
        val_fraction = saved_config(run_dir).val_fraction
    except ValueError:  # a model directory beside its tokens, without a checkpoint: the default split
        val_fraction = 0.1
    val = TokenDataset.from_file(path, val_fraction).splits["val"]
    count = (len(val) - 1) // block_size
    count = min(count, max_windows) if max_windows else count
    if count < 1:
        raise ValueError(f"the val split of {path} holds {len(val)} tokens, fewer than a block of {block_size}")
    x = np.asarray(val[:count * block_size], np.int64).reshape(count, block_size)
    y = np.asarray(val[1:count * block_size + 1], np.int64).reshape(count, block_size)
    return x, y


def perplexity(model, x, y, rows: int = 16) -> float:
    """exp of the token-mean cross-entropy of model's logits over (x, y), `rows` windows at a time."""
    total = 0.0
    for i in range(0, len(x), rows):
        logits = model.forward(x[i:i + rows])
        total += cross_entropy_forward(logits, y[i:i + rows], overwrite_logits=True)[0] * x[i:i + rows].size
    return math.exp(total / x.size)


def generation_speed(models: dict, prompt, new_tokens: int, rounds: int) -> dict:
    """{name: median tokens/s} of greedy generation of `new_tokens` after `prompt` (1, T), the models
    taking turns within each round."""
    times = {name: [] for name in models}
    for model in models.values():  # untimed: first-call allocations and BLAS start-up
        model.generate(prompt, 2, temperature=0)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(prompt, new_tokens, temperature=0)
            times[name].append(time.perf_counter() - start)
    return {name: new_tokens / statistics.median(seconds) for name, seconds in times.items()}


def run(run_dir: str, outlier_threshold: float | None = None, max_windows: int | None = None,
        prompt_tokens: int = 16, new_tokens: int = 48, rounds: int = 3, echo=print) -> dict:
    """The comparison (see the module docstring) -> {"run", "model", "windows", "tokens", "variants":
    [{"name", "weight_bytes", "val_loss", "perplexity", "ppl_change", "outlier_rows"}], "generation":
    {"float32", "int8 per-channel"} tokens/s}."""
    source = model_directory(run_dir)
    check_int8_family(source)
    float_model = GPT.from_pretrained(source, dtype="float32")
    config, params = float_model.config, {name: np.array(p) for name, p in float_model.params.items()}
    names = linear_weight_names(config)
    x, y = val_windows(run_dir, config.block_size, max_windows)
    outliers = {}
    if outlier_threshold is not None:
        outliers = outlier_features(float_model, calibration_inputs(run_dir, config.block_size, 8), names,
                                    outlier_threshold)
    schemes = {"int8 per-channel": ("channel", {}), "int8 per-tensor": ("tensor", {})}
    if outlier_threshold is not None:
        schemes[f"int8 per-channel + outliers >= {outlier_threshold:g}"] = ("channel", outliers)
    models = {"float32": float_model}
    for name, (granularity, rows) in schemes.items():
        models[name] = Int8GPT(config, {**params, **{n: quantize_int8(params[n], granularity, rows.get(n))
                                                     for n in names}})
    variants = []
    for name, model in models.items():
        echo(f"scoring {name} on {x.size} val tokens ...")
        ppl = perplexity(model, x, y)
        variants.append({"name": name, "perplexity": ppl, "val_loss": math.log(ppl),
                         "weight_bytes": int(sum(p.nbytes for p in model.params.values())),
                         "linear_weight_bytes": int(sum(model.params[n].nbytes for n in names)),
                         "outlier_rows": int(sum(len(r) for r in schemes.get(name, (None, {}))[1].values()))})
    for variant in variants:
        variant["ppl_change"] = variant["perplexity"] / variants[0]["perplexity"] - 1
    echo(f"timing greedy generation of {new_tokens} tokens, {rounds} rounds ...")
    speed = generation_speed({"float32": float_model, "int8 per-channel": models["int8 per-channel"]},
                             x[:1, :prompt_tokens], new_tokens, rounds)
    return {"run": os.path.abspath(run_dir), "model": {k: getattr(config, k) for k in
                                                       ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
            "windows": int(len(x)), "tokens": int(x.size), "variants": variants,
            "generation": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds,
                           "tokens_per_s": speed}}


def format_table(result: dict) -> str:
    model = result["model"]
    lines = [f"{result['run']}: GPT-2 {model['n_layer']} layers x {model['n_embd']} wide, vocabulary "
             f"{model['vocab_size']}; {result['tokens']} val tokens ({result['windows']} windows)",
             f"{'weights':<36}{'MiB':>8}{'linear MiB':>12}{'val loss':>10}{'perplexity':>12}{'change':>9}"]
    for v in result["variants"]:
        lines.append(f"{v['name']:<36}{v['weight_bytes'] / 2**20:>8.2f}{v['linear_weight_bytes'] / 2**20:>12.2f}"
                     f"{v['val_loss']:>10.4f}{v['perplexity']:>12.3f}{v['ppl_change']:>+9.3%}")
    g = result["generation"]
    speed = g["tokens_per_s"]
    lines.append(f"greedy generation, {g['new_tokens']} tokens after {g['prompt_tokens']} (median of "
                 f"{g['rounds']} interleaved rounds): float32 {speed['float32']:.1f} tokens/s, int8 "
                 f"{speed['int8 per-channel']:.1f} tokens/s ({speed['int8 per-channel'] / speed['float32']:.2f}x; "
                 "NumPy has no int8 matmul: the int8 block is widened to float per product)")
    return "\n".join(lines)

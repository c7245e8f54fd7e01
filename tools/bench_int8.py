"""int8 weights against float32 on a trained run: weight bytes, validation perplexity, generation speed.

    ringpipe bench int8 RUN_DIR [--outlier-threshold 6] [--json PATH]

The run's float32 model and, quantized in memory from it (model/quantization/int8.py), int8 with one
absmax scale per output channel, int8 with one scale per tensor (what per-channel must beat) and,
with --outlier-threshold, per-channel with LLM.int8()'s outlier rows in float. Every variant is
scored on the same windows: every back-to-back block_size window of the run's val split (or the
first --max-windows), perplexity = exp(token-mean cross-entropy), and the KL divergence of each
variant's next-token distribution from float32's (paired, so it ranks variants whose perplexities
differ by less than the val sample's noise), and the relative error of the quantized weights. Generation: greedy decoding with
the KV cache from a val-split prompt, float32 and int8 interleaved round by round (the machine is
shared: medians of the rounds, never one timing).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time

import numpy as np

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.quantization.gpt2_int8 import Int8GPT, linear_weight_names
from ringpipe.model.quantization.int8 import quantize_int8
from ringpipe.model.quantization.outliers import outlier_features
from ringpipe.model.quantization.quantize import (calibration_inputs, check_int8_family, load_float_model,
                                                  model_directory)
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


def _log_softmax(logits):
    """(..., V) -> log-probabilities in float64."""
    logits = logits.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def score(models: dict, x, y, rows: int = 16, echo=print) -> dict:
    """{name: {"val_loss", "perplexity", "kl_from_float32", "ppl_change_ci95"}} over (x, y), `rows`
    windows at a time, each batch through every model in turn. kl_from_float32: the token-mean KL
    divergence of the model's next-token distribution from the first model's (float32), in nats —
    paired on the same tokens, it separates the variants where their perplexities differ by less than
    the noise of a val sample. ppl_change_ci95: a 95 % interval of the perplexity change against
    float32, exp(mean ± 1.96 standard errors) - 1 of the per-window paired differences of mean
    cross-entropy (windows are back-to-back, so they are treated as independent samples)."""
    window_nll = {name: np.zeros(len(x)) for name in models}
    kl = dict.fromkeys(models, 0.0)
    for start in range(0, len(x), rows):
        if start // rows % 10 == 0:
            echo(f"scoring windows {start}..{min(start + 10 * rows, len(x))} of {len(x)} ...")
        inputs, targets = x[start:start + rows], y[start:start + rows]
        reference = None
        for name, model in models.items():
            logp = _log_softmax(model.forward(inputs))
            window_nll[name][start:start + rows] = -np.take_along_axis(logp, targets[..., None], -1)[..., 0].mean(-1)
            if reference is None:
                reference = logp
            kl[name] += (np.exp(reference) * (reference - logp)).sum()
    base = next(iter(models))
    result = {}
    for name in models:
        diff = window_nll[name] - window_nll[base]
        half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        val_loss = float(window_nll[name].mean())
        result[name] = {"val_loss": val_loss, "perplexity": math.exp(val_loss), "kl_from_float32": kl[name] / x.size,
                        "ppl_change_ci95": [math.expm1(diff.mean() - half), math.expm1(diff.mean() + half)]}
    return result


def targets(result: dict) -> list:
    """Issue #20's checks on a `run` result: [{"target", "measured", "met"}]. Per-channel must beat
    per-tensor in closeness to float32, measured by the paired KL divergence (a perplexity change of
    either can land on either side of zero by chance; its 95 % interval is printed beside it)."""
    by_name = {v["name"]: v for v in result["variants"]}
    fp, channel, tensor = by_name["float32"], by_name["int8 per-channel"], by_name["int8 per-tensor"]
    shrink = fp["linear_weight_bytes"] / channel["linear_weight_bytes"]
    return [
        {"target": "linear weights about 4x smaller (int8 per channel)", "measured": f"{shrink:.2f}x",
         "met": bool(shrink >= 3.9)},
        {"target": "per-channel perplexity change within 1 % of float32",
         "measured": f"{channel['ppl_change']:+.3%}", "met": bool(abs(channel["ppl_change"]) <= 0.01)},
        {"target": "per-channel closer to float32 than per-tensor (KL nats/token)",
         "measured": f"{channel['kl_from_float32']:.2e} vs {tensor['kl_from_float32']:.2e}",
         "met": bool(channel["kl_from_float32"] < tensor["kl_from_float32"])},
    ]


def weight_error(params: dict, model, names) -> float:
    """sqrt(sum of squared errors / sum of squares) over the linear weights `names` of `model` against the
    float `params`: the relative Frobenius error of the quantized weights (0 for the float model)."""
    error = total = 0.0
    for name in names:
        weight = model.params[name]
        approx = weight.dequantize() if hasattr(weight, "dequantize") else np.asarray(weight)
        error += float(((approx.astype(np.float64) - params[name]) ** 2).sum())
        total += float((params[name].astype(np.float64) ** 2).sum())
    return math.sqrt(error / total)


def generation_speed(models: dict, prompt, new_tokens: int, rounds: int) -> dict:
    """{name: {"tokens_per_s", "tokens_per_cpu_s"}}: medians over `rounds` of greedy generation of
    `new_tokens` after `prompt` (1, T), the models taking turns within each round. Per CPU second (this
    process's, all threads) too: on a shared machine the wall time counts the other users' turns."""
    times = {name: [] for name in models}
    for model in models.values():  # untimed: first-call allocations and BLAS start-up
        model.generate(prompt, 2, temperature=0)
    for _ in range(rounds):
        for name, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            model.generate(prompt, new_tokens, temperature=0)
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: {"tokens_per_s": new_tokens / statistics.median(t[0] for t in timings),
                   "tokens_per_cpu_s": new_tokens / statistics.median(t[1] for t in timings)}
            for name, timings in times.items()}


def run(run_dir: str, outlier_threshold: float | None = None, max_windows: int | None = None,
        prompt_tokens: int = 16, new_tokens: int = 48, rounds: int = 3, echo=print) -> dict:
    """The comparison (see the module docstring) -> {"run", "model", "windows", "tokens", "variants":
    [{"name", "weight_bytes", "linear_weight_bytes", "val_loss", "perplexity", "ppl_change", "ppl_change_ci95",
    "kl_from_float32", "weight_error", "outlier_rows"}], "generation":
    {"tokens_per_s": {"float32", "int8 per-channel"}: {"tokens_per_s", "tokens_per_cpu_s"}}, "targets"}."""
    source = model_directory(run_dir)  # a run stopped early: its newest checkpoint, a sharded one included
    name, config, params = load_float_model(source)
    check_int8_family(source, name)
    float_model = GPT(dataclasses.replace(config, dtype="float32"),
                      params={n: np.asarray(p, np.float32) for n, p in params.items()})
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
    echo(f"scoring {', '.join(models)} on {x.size} val tokens ...")
    scores = score(models, x, y, echo=echo)
    variants = []
    for name, model in models.items():
        variants.append({"name": name, **scores[name],
                         "ppl_change": scores[name]["perplexity"] / scores["float32"]["perplexity"] - 1,
                         "weight_error": weight_error(params, model, names),
                         "weight_bytes": int(sum(p.nbytes for p in model.params.values())),
                         "linear_weight_bytes": int(sum(model.params[n].nbytes for n in names)),
                         "outlier_rows": int(sum(len(r) for r in schemes.get(name, (None, {}))[1].values()))})
    echo(f"timing greedy generation of {new_tokens} tokens, {rounds} rounds ...")
    speed = generation_speed({"float32": float_model, "int8 per-channel": models["int8 per-channel"]},
                             x[:1, :prompt_tokens], new_tokens, rounds)
    result = {"run": os.path.abspath(run_dir), "model": {k: getattr(config, k) for k in
                                                       ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
            "windows": int(len(x)), "tokens": int(x.size), "variants": variants,
            "generation": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds,
                           "tokens_per_s": speed}}
    result["targets"] = targets(result)
    return result


def format_table(result: dict) -> str:
    model = result["model"]
    lines = [f"{result['run']}: GPT-2 {model['n_layer']} layers x {model['n_embd']} wide, vocabulary "
             f"{model['vocab_size']}; {result['tokens']} val tokens ({result['windows']} windows)",
             f"{'weights':<34}{'MiB':>7}{'linear MiB':>11}{'perplexity':>11}{'change':>9}{'95% interval':>21}"
             f"{'KL nats':>10}{'W error':>9}"]
    for v in result["variants"]:
        lines.append(f"{v['name']:<34}{v['weight_bytes'] / 2**20:>7.2f}{v['linear_weight_bytes'] / 2**20:>11.2f}"
                     f"{v['perplexity']:>11.3f}{v['ppl_change']:>+9.3%}"
                     f"{'[%+.3f%%, %+.3f%%]' % tuple(100 * c for c in v['ppl_change_ci95']):>21}{v['kl_from_float32']:>10.2e}"
                     f"{v['weight_error']:>9.2e}")
    g = result["generation"]
    speed = g["tokens_per_s"]
    lines.append(f"greedy generation, {g['new_tokens']} tokens after {g['prompt_tokens']} (medians of {g['rounds']} "
                 "interleaved rounds), tokens/s of wall | of CPU time:")
    for name, rate in speed.items():
        lines.append(f"  {name:<18}{rate['tokens_per_s']:>8.1f} | {rate['tokens_per_cpu_s']:>8.1f}"
                     f"   ({rate['tokens_per_cpu_s'] / speed['float32']['tokens_per_cpu_s']:.2f}x float32's CPU rate)")
    lines.append("  (NumPy has no int8 matmul: the int8 block is widened to float for each product)")
    for t in result.get("targets", []):
        lines.append(f"{'met' if t['met'] else 'NOT MET':>8}  {t['target']}: {t['measured']}")
    return "\n".join(lines)

"""`ringpipe bench generate`: what splitting generation over workers costs. Tokens/s and time to first
token for 1, 2 and 4 workers (tensor-parallel, pipeline and data-parallel layouts) on a model that fits
one process.

    ringpipe bench generate --json generate.json

A GPT-2 initialised from a seed (the arithmetic does not depend on training) is saved once; each
layout's workers read their shards of it and stay up while the rounds take turns, layout after layout
(A/B interleaved: a shared machine's load hits every layout alike); the median round is reported.
Greedy decoding, so every layout must give the one-worker tokens ("same" column). Tokens/s counts the
new tokens of all prompts over the driver's wall time of the call (prefill included); the time to
first token is from the call to each prompt's first token, mean and max over the prompts. Each
worker gets `threads_per_worker` BLAS threads (default 1: a worker per core, and no layout's threads
spin against another's on a shared machine).
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import numpy as np

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.inference.distributed_generator import DistributedGenerator, check_generation_layout
from ringpipe.model.inference.weights import weights_source

DEFAULT_LAYOUTS = ("1", "tp2", "pp2", "dp2", "tp4", "pp4", "tp2xpp2")


def parse_layout(name: str) -> dict:
    """"1" -> {}; "tp2xpp2" -> {"tp": 2, "pp": 2}; ValueError naming the part that is not dpN, tpN or ppN."""
    layout = {}
    for part in name.split("x") if name != "1" else []:
        axis, size = part[:2], part[2:]
        if axis not in ("dp", "tp", "pp") or not size.isdigit() or int(size) < 1 or axis in layout:
            raise ValueError(f"--layouts: {name!r} is not 1 or dpN/tpN/ppN joined by x (e.g. tp2xpp2)")
        layout[axis] = int(size)
    return layout


def run(layouts=DEFAULT_LAYOUTS, n_layer: int = 8, n_head: int = 8, n_embd: int = 256, block_size: int = 128,
        vocab_size: int = 8192, prompts: int = 8, prompt_length: int = 32, new_tokens: int = 32, rounds: int = 3,
        dtype: str = "float32", threads_per_worker: int = 1, echo=lambda line: None) -> list[dict]:
    """One row per layout: {"layout", "workers", "dp", "tp", "pp", "tokens_per_s", "ttft_mean_s",
    "ttft_max_s", "rounds": [...], "weight_mib_per_rank", "same_tokens"}."""
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                       vocab_size=vocab_size, dtype=dtype)
    parsed = {name: parse_layout(name) for name in layouts}
    for layout in parsed.values():  # before any weight is made or worker started
        check_generation_layout({"family": "gpt2", "model": dataclasses.asdict(config)}, layout.get("dp", 1),
                                layout.get("tp", 1), layout.get("pp", 1))
    ids = np.random.default_rng(0).integers(0, vocab_size, (prompts, prompt_length)).tolist()
    generators, samples, tokens = {}, {name: [] for name in parsed}, {}
    with tempfile.TemporaryDirectory(prefix="ringpipe-bench-generate-") as directory:
        GPT(config, seed=0).save_pretrained(directory)
        source = weights_source(directory)
        try:
            for name, layout in parsed.items():
                echo(f"starting {name}: {int(np.prod(list(layout.values()) or [1]))} workers")
                generators[name] = DistributedGenerator(source, **layout,
                                                        cluster_options={"threads_per_worker": threads_per_worker})
            for r in range(rounds):
                for name, generator in generators.items():
                    start = time.perf_counter()
                    out = generator.generate(ids, new_tokens, temperature=0)
                    wall = time.perf_counter() - start
                    first = list(out["first_token_s"].values())
                    samples[name].append({"wall_s": wall, "tokens_per_s": prompts * new_tokens / wall,
                                          "ttft_mean_s": statistics.mean(first), "ttft_max_s": max(first)})
                    tokens.setdefault(name, out["tokens"])
                    echo(f"round {r + 1}/{rounds} {name}: {prompts * new_tokens / wall:.0f} tokens/s")
            weights = {name: generator.weight_bytes() for name, generator in generators.items()}
        finally:
            for generator in generators.values():
                generator.close()
    reference = tokens[next(iter(parsed))]
    rows = []
    for name, layout in parsed.items():
        runs = samples[name]
        dp, tp, pp = layout.get("dp", 1), layout.get("tp", 1), layout.get("pp", 1)
        rows.append({"layout": name, "workers": dp * tp * pp, "dp": dp, "tp": tp, "pp": pp,
                     "tokens_per_s": statistics.median(s["tokens_per_s"] for s in runs),
                     "ttft_mean_s": statistics.median(s["ttft_mean_s"] for s in runs),
                     "ttft_max_s": statistics.median(s["ttft_max_s"] for s in runs),
                     "weight_mib_per_rank": max(weights[name]) / 2**20, "same_tokens": tokens[name] == reference,
                     "rounds": runs, "model": {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
                                               "block_size": block_size, "vocab_size": vocab_size, "dtype": dtype},
                     "prompts": prompts, "prompt_length": prompt_length, "new_tokens": new_tokens,
                     "threads_per_worker": threads_per_worker})
    return rows


def format_table(rows: list) -> str:
    first = rows[0]
    model = first["model"]
    lines = [f"GPT-2 {model['n_layer']} layers × {model['n_embd']} wide, {model['n_head']} heads, vocabulary "
             f"{model['vocab_size']}, {model['dtype']}; {first['prompts']} prompts × {first['prompt_length']} "
             f"tokens, {first['new_tokens']} new tokens each (greedy); {first['threads_per_worker']} BLAS "
             f"thread(s) per worker; median of {len(first['rounds'])} rounds",
             f"{'layout':>9} {'workers':>7} {'tokens/s':>9} {'TTFT mean':>10} {'TTFT max':>9} {'MiB/rank':>9} same"]
    for row in rows:
        lines.append(f"{row['layout']:>9} {row['workers']:>7} {row['tokens_per_s']:>9.1f} "
                     f"{row['ttft_mean_s'] * 1e3:>8.1f}ms {row['ttft_max_s'] * 1e3:>7.1f}ms "
                     f"{row['weight_mib_per_rank']:>9.1f} {'yes' if row['same_tokens'] else 'NO'}")
    return "\n".join(lines)

"""The planner against published throughput: Megatron-LM's weak-scaling table (Narayanan et al.
2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", SC'21,
Table 1: GPT models on Selene's A100s, V = 51,200, s = 2048, mixed precision, activation
recomputation).

The machine is model/planning/machines/a100-8x-node.json, spec-sheet values only; ONE efficiency
constant (the fraction of peak the matmuls reach) is fitted here on one row, ignoring the file's, and
every other row is predicted with it; the file's "efficiency" is the value this fit gives (0.68),
so `ringpipe plan --machine a100-8x-node` uses it. Each row's time comes from the planner's step model with the row's (t, p, d,
global batch); throughput per GPU uses the paper's FLOP count (its Eq. 3, which counts the
recomputed forward): F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)).

Assumptions the table does not give: micro-batch size 1 and the non-interleaved 1F1B schedule.
"""
from __future__ import annotations

import copy

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.machine import load_machine
from ringpipe.model.planning.memory import Candidate
from ringpipe.model.planning.step_time import predict_step

VOCAB, SEQUENCE = 51200, 2048
# (billions of parameters, heads, hidden, layers, t, p, GPUs, global batch, published TFLOP/s per GPU)
TABLE = [(1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
         (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
         (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
         (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
         (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163)]
FIT_ROW = 6  # 145.6B: one row in the middle of the table, pipeline and tensor parallelism both in use


def paper_flops(batch, layers, hidden) -> float:
    """Narayanan et al. 2021, Eq. 3: FLOPs per iteration with activation recomputation."""
    return 96 * batch * SEQUENCE * layers * hidden ** 2 * (1 + SEQUENCE / (6 * hidden) + VOCAB / (16 * layers * hidden))


def predicted_tflops(row, machine, microbatch_rows: int = 1) -> float:
    _, heads, hidden, layers, t, p, gpus, batch, _ = row
    d = gpus // (t * p)
    inventory = GPT2Inventory(GPTConfig(n_layer=layers, n_head=heads, n_embd=hidden, block_size=SEQUENCE,
                                        vocab_size=VOCAB, dtype="float16"), attention_kernel=False)
    candidate = Candidate(dp=d, tp=t, pp=p, microbatches=batch // (d * microbatch_rows), recompute=True)
    machine = copy.deepcopy(machine)
    machine.hosts = -(-gpus // machine.devices_per_host)
    timing = predict_step(inventory, candidate, batch, machine, ranks_per_host=machine.devices_per_host)
    return paper_flops(batch, layers, hidden) / (gpus * timing.seconds) / 1e12


def fit_efficiency(row, machine) -> float:
    """The efficiency at which the planner's prediction of `row` equals its published throughput."""
    low, high = 0.05, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        machine.efficiency = middle
        if predicted_tflops(row, machine) < row[-1]:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def run(progress=print) -> dict:
    machine = load_machine("a100-8x-node")
    machine.efficiency = fit_efficiency(TABLE[FIT_ROW], machine)
    progress(f"efficiency fitted on the {TABLE[FIT_ROW][0]}B row: {machine.efficiency:.3f} of the A100's "
             f"{machine.peak('float16') / 1e12:.0f} TFLOP/s (fp16 tensor cores)")
    rows = []
    for k, row in enumerate(TABLE):
        predicted = predicted_tflops(row, machine)
        rows.append({"params_billion": row[0], "t": row[4], "p": row[5], "gpus": row[6], "batch": row[7],
                     "published_tflops": row[-1], "predicted_tflops": round(predicted, 1),
                     "error": round(predicted / row[-1] - 1, 4), "fitted": k == FIT_ROW})
        progress(f"{row[0]:>7}B t{row[4]} p{row[5]:<3} {row[6]:>5} GPUs: published {row[-1]} TFLOP/s per GPU, "
                 f"predicted {predicted:.1f} ({predicted / row[-1] - 1:+.1%})" + ("  [fitted]" if k == FIT_ROW else ""))
    held_out = [abs(r["error"]) for r in rows if not r["fitted"]]
    return {"efficiency": machine.efficiency, "rows": rows, "max_held_out_error": max(held_out),
            "mean_held_out_error": sum(held_out) / len(held_out)}

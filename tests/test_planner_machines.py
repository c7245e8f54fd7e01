"""Machine files: the spec sheet's peak of each dtype, used for a run's compute time and its MFU, and
the shipped constants agreeing with what the benchmarks fit."""
import json

import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.machine import load_machine
from ringpipe.model.planning.memory import Candidate
from ringpipe.model.planning.step_time import predict_step
from tests.conftest import one_error_line, run_cli

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)


def test_shipped_gpu_files_carry_the_spec_sheet_dense_peak_of_each_dtype():
    assert load_machine("a100-8x-node").peak_flops_by_dtype == {
        "float64": 19.5e12, "float32": 19.5e12, "tf32": 156e12, "float16": 312e12, "bfloat16": 312e12}
    assert load_machine("h100-8x-node").peak_flops_by_dtype == {
        "float64": 67e12, "float32": 67e12, "tf32": 495e12, "float16": 989e12, "bfloat16": 989e12}


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_a_run_is_timed_and_its_mfu_taken_at_its_own_dtypes_peak(dtype):
    machine = load_machine("a100-8x-node")
    inventory = GPT2Inventory(GPTConfig(**GPT2_SMALL, dtype=dtype))
    timing = predict_step(inventory, Candidate(dp=8), 8, machine)
    achieved = timing.model_flops / (timing.seconds * 8)  # FLOP/s per GPU
    assert achieved < machine.peak(dtype) * machine.efficiency
    assert timing.mfu == pytest.approx(achieved / machine.peak(dtype))


def test_a_float64_plan_on_a100s_stays_under_the_fp64_peak():
    result = run_cli("plan", "--nproc", 8, "--machine", "a100-8x-node", "--dtype", "float64", "--top", 1)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("1 "))
    mfu = float(next(word for word in row.split() if word.endswith("%")).rstrip("%")) / 100
    # matmuls dominate: MFU near the efficiency, of 19.5 TFLOP/s (of the fp16 peak 312 it was ~13 %)
    assert 0.3 < mfu <= 0.68


def test_a_machine_file_without_the_runs_dtype_is_one_line_naming_machine_and_dtype(tmp_path):
    machine = tmp_path / "half.json"
    machine.write_text(json.dumps({"name": "half-only", "kind": "gpu", "devices_per_host": 2,
                                   "peak_flops_by_dtype": {"float16": 1e14}, "memory_bytes": 8e10,
                                   "links": {"same_host": {"latency": 1e-5, "bandwidth": 1e11}}}))
    line = one_error_line(run_cli("plan", "--n-layer", 2, "--n-embd", 64, "--n-head", 2, "--block-size", 16,
                                  "--vocab", 64, "--nproc", 2, "--dtype", "float64", "--machine", machine))
    assert "half-only" in line and "no peak_flops_by_dtype entry for float64 (has float16)" in line


def test_a_machine_file_with_no_peak_at_all_is_one_line(tmp_path):
    machine = tmp_path / "nopeak.json"
    machine.write_text(json.dumps({"name": "nopeak", "kind": "gpu", "memory_bytes": 8e10,
                                   "links": {"same_host": {"latency": 1e-5, "bandwidth": 1e11}}}))
    line = one_error_line(run_cli("plan", "--nproc", 1, "--machine", machine))
    assert str(machine) in line and "peak_flops (or peak_flops_by_dtype) is missing" in line


def test_the_a100_files_efficiency_is_the_one_the_published_benchmark_fits():
    from ringpipe.tools.bench_plan_published import FIT_ROW, TABLE, fit_efficiency

    machine = load_machine("a100-8x-node")
    shipped = machine.efficiency
    assert fit_efficiency(TABLE[FIT_ROW], machine) == pytest.approx(shipped, abs=0.002)

"""`ringpipe bench gpu-step`: the GPU benchmark's code, smoke-tested on the CPU with a tiny shape."""
import json
import math

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.model.gpt2.config import GPTConfig, param_shapes
from ringpipe.tools.bench_gpu_step import GPT2_124M, flops_per_token, peak_tflops

TINY = ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--vocab-size", "50", "--batch-size", "2", "--steps", "1", "--warmup", "1"]


def test_flops_per_token_of_gpt2_124m_count_6n_plus_attention():
    shapes = param_shapes(GPTConfig(**{k: v for k, v in GPT2_124M.items() if k != "batch_size"}))
    n = sum(math.prod(shape) for name, shape in shapes.items() if name != "wpe.weight")
    assert n == 123_653_376  # 124,439,808 parameters less the 786,432 of the position embedding
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024


def test_peaks_are_the_dtypes_dense_peak_of_the_named_gpu():
    assert peak_tflops("NVIDIA H200", "fp16-mixed", False, None) == 989.4
    assert peak_tflops("NVIDIA H200", "float32", True, None) == 494.7
    assert peak_tflops("NVIDIA H200", "float32", False, None) == 67.0
    assert peak_tflops("Some GPU", "float32", False, None) is None
    assert peak_tflops("Some GPU", "float32", False, 100.0) == 100.0


@pytest.mark.timeout(120)
def test_bench_gpu_step_runs_both_dtypes_and_writes_json_on_a_tiny_cpu_shape(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch eager column needs torch")
    pytest.importorskip("transformers", reason="the PyTorch eager column needs transformers")
    path = tmp_path / "result.json"
    result = CliRunner().invoke(main, ["bench", "gpu-step", *TINY, "--json", str(path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(path.read_text())["rows"]
    assert [(r["implementation"], r["dtype"]) for r in rows] == [
        ("ringpipe", "float32"), ("pytorch_eager", "float32"), ("ringpipe", "fp16-mixed"),
        ("pytorch_eager", "fp16-mixed")]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak for "cpu"
    assert rows[0]["vs_pytorch"] > 0 and "ringpipe" in result.output


def test_bench_gpu_step_without_comparison_says_why_the_column_is_missing():
    result = CliRunner().invoke(main, ["bench", "gpu-step", *TINY, "--dtypes", "float32", "--no-compare"])
    assert result.exit_code == 0, result.output
    assert "skipped: --no-compare" in result.output

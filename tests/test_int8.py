"""int8 weights (model/quantization/): absmax scales and their error, the int8 product, outlier
features, the int8 model directory, `ringpipe quantize`, and generation from it."""
import json
import shutil

import numpy as np
import pytest

from tests.conftest import TEXT, one_error_line, run_cli
from ringpipe.model.data.dataset import write_token_file
from ringpipe.model.data.tokenizer import make_tokenizer
from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.quantization.gpt2_int8 import Int8GPT, linear_weight_names
from ringpipe.model.quantization.int8 import QMAX, Int8Weight, quantize_int8
from ringpipe.model.quantization.outliers import outlier_features
from ringpipe.model.quantization.quantize import TOKEN_FILE, quantize_run
from ringpipe.runtime.files import load_tensors, save_tensors


def _weight(rng, shape=(48, 40)):
    return rng.normal(0, 0.02, shape).astype(np.float32)


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_dequantized_weights_are_within_half_a_scale_step_of_the_originals(granularity):
    weight = _weight(np.random.default_rng(0))
    q = quantize_int8(weight, granularity)
    assert q.values.dtype == np.int8 and np.abs(q.values).max() == QMAX
    assert np.all(np.abs(q.dequantize() - weight) <= q.scale / 2 * (1 + 1e-5))


def test_per_channel_scales_beat_one_per_tensor_on_a_weight_with_outlier_channels():
    weight = _weight(np.random.default_rng(1))
    weight[:, [3, 17]] *= 50  # two output channels far larger than the rest
    errors = {g: (quantize_int8(weight, g).dequantize() - weight) ** 2 for g in ("channel", "tensor")}
    ordinary = np.delete(np.arange(weight.shape[1]), [3, 17])
    assert errors["channel"].mean() * 10 < errors["tensor"].mean()
    # the ordinary channels keep their own resolution instead of the outliers' 50x coarser one
    assert errors["channel"][:, ordinary].mean() * 1000 < errors["tensor"][:, ordinary].mean()


def test_the_int8_product_is_the_product_with_the_dequantized_weight():
    rng = np.random.default_rng(2)
    q = quantize_int8(_weight(rng).astype(np.float64), outlier_rows=[5, 30])
    x = rng.normal(size=(7, 48))
    np.testing.assert_allclose(x @ q, x @ q.dequantize(), rtol=1e-12, atol=1e-14)


def test_outlier_rows_stay_in_float_and_leave_the_scales_to_the_others():
    weight = _weight(np.random.default_rng(3))
    weight[9] = 1.0  # an input feature whose row would set every column's scale
    q = quantize_int8(weight, outlier_rows=[9])
    np.testing.assert_array_equal(q.dequantize()[9], weight[9])
    assert np.all(q.values[9] == 0) and np.all(q.scale < 0.1 / QMAX)


def test_outlier_features_are_the_inputs_whose_activations_reach_the_threshold():
    class Linear:  # the least a model needs: params, and a forward through x @ params["w"]
        params = {"w": np.ones((4, 2))}

        def forward(self, x):
            return x @ self.params["w"]

    batches = [np.array([[0.5, -7.0, 1.0, 0.0]]), np.array([[6.0, 2.0, -5.9, 0.0]])]
    model = Linear()
    assert outlier_features(model, batches, ["w"], threshold=6.0)["w"].tolist() == [0, 1]
    assert isinstance(model.params["w"], np.ndarray)  # the weight is back in place


@pytest.mark.parametrize("axis", [0, 1])
def test_a_tensor_parallel_shard_of_an_int8_weight_computes_its_share_of_the_product(axis):
    rng = np.random.default_rng(4)
    q = quantize_int8(_weight(rng).astype(np.float64), outlier_rows=[2, 40])
    x = rng.normal(size=(3, 48))
    halves = np.split(np.arange(q.shape[axis]), 2)
    shards = [q.select(axis, half) for half in halves]
    if axis == 1:  # column-parallel: each rank has its output channels
        np.testing.assert_allclose(np.concatenate([x @ s for s in shards], axis=1), x @ q, rtol=1e-12)
    else:  # row-parallel: each rank has its input features; the partial products sum to the whole
        np.testing.assert_allclose(sum(x[:, half] @ s for half, s in zip(halves, shards)), x @ q, rtol=1e-12)


# ---- a GPT-2 run quantized ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small GPT-2 model directory (random weights, char tokenizer) with its int8 model beside it."""
    directory = tmp_path_factory.mktemp("int8")
    tokenizer = make_tokenizer("char", TEXT)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=tokenizer.vocab_size)
    GPT(config, seed=0).save_pretrained(directory / "run", tokenizer=tokenizer)
    write_token_file(tokenizer.encode(TEXT), str(directory / "run" / TOKEN_FILE))
    summary = quantize_run(str(directory / "run"), str(directory / "run-int8"))
    return directory, tokenizer, summary


def test_an_int8_linear_weight_takes_a_byte_per_element_and_a_float32_scale_per_output_channel(run):
    directory, _, summary = run
    int8 = Int8GPT.from_pretrained(directory / "run-int8")
    for name in linear_weight_names(int8.config):
        (inputs, outputs), weight = int8.params[name].shape, int8.params[name]
        assert weight.values.nbytes == inputs * outputs and weight.nbytes == inputs * outputs + 4 * outputs
    assert summary["int8_bytes"] == int8.weight_bytes() < summary["float_bytes"]


def test_generating_from_int8_equals_generating_from_the_dequantized_float_model(run):
    directory, tokenizer, _ = run
    int8 = Int8GPT.from_pretrained(directory / "run-int8")
    dequantized = GPT(int8.config, params={name: p.dequantize() if isinstance(p, Int8Weight) else p
                                           for name, p in int8.params.items()})
    prompt = np.array([tokenizer.encode("3 little pigs")])
    np.testing.assert_allclose(int8.forward(prompt), dequantized.forward(prompt), rtol=1e-4, atol=1e-5)
    for options in ({"temperature": 0}, {"temperature": 0.8, "top_k": 5, "seed": 3}):
        np.testing.assert_array_equal(int8.generate(prompt, 24, **options),
                                      dequantized.generate(prompt, 24, **options))


def test_an_int8_model_saved_again_reads_back_the_same_int8_weights(run, tmp_path):
    directory, tokenizer, _ = run
    int8 = Int8GPT.from_pretrained(directory / "run-int8")
    int8.save_pretrained(tmp_path / "again", tokenizer=tokenizer)
    again = Int8GPT.from_pretrained(tmp_path / "again")
    for name, weight in int8.params.items():
        if isinstance(weight, Int8Weight):
            np.testing.assert_array_equal(again.params[name].values, weight.values)
            np.testing.assert_array_equal(again.params[name].scale, weight.scale)
        else:
            np.testing.assert_array_equal(again.params[name], weight)


def test_an_int8_model_refuses_to_compute_gradients(run):
    int8 = Int8GPT.from_pretrained(run[0] / "run-int8")
    inputs = np.zeros((1, 4), np.int64)
    with pytest.raises(TypeError, match="inference only"):
        int8.loss_and_grads(inputs, inputs)


def test_quantize_and_generate_through_the_cli(run, tmp_path):
    directory, _, _ = run
    result = run_cli("quantize", directory / "run", "--int8", "--per-tensor", "--out", tmp_path / "q")
    assert result.exit_code == 0 and "per tensor" in result.output, result.output
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["granularity"] == "tensor"
    result = run_cli("generate", "--checkpoint", tmp_path / "q", "--prompt", "3 little", "--max-new-tokens", 5)
    assert result.exit_code == 0 and result.output.startswith("3 little"), result.output


def test_quantize_refuses_an_out_holding_another_runs_int8_model_and_changes_nothing(run, tmp_path):
    directory, _, _ = run
    other = tmp_path / "other"
    shutil.copytree(directory / "run", other)
    before = {p.name: p.read_bytes() for p in (directory / "run-int8").iterdir()}
    result = run_cli("quantize", other, "--int8", "--out", directory / "run-int8")
    line = one_error_line(result)
    assert result.exit_code == 2 and line.startswith("Error: Invalid value for --out"), result.output
    assert f"holds the int8 model of another run ({directory / 'run'})" in line, line
    assert {p.name: p.read_bytes() for p in (directory / "run-int8").iterdir()} == before


def test_generate_across_tensor_parallel_workers_from_int8_prints_what_one_process_prints(run):
    directory, _, _ = run
    flags = ("generate", "--checkpoint", directory / "run-int8", "--prompt", "3 little", "--max-new-tokens", 8)
    alone, split = run_cli(*flags), run_cli(*flags, "--nproc", "2", "--tp", "2")
    assert alone.exit_code == 0 and split.exit_code == 0, (alone.output, split.output)
    assert split.output == alone.output


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2"), ("--dp", "2")], ids=["tp2", "pp2", "dp2"])
def test_an_int8_file_whose_config_lost_its_quantization_is_refused_across_workers_as_in_one_process(
        run, tmp_path, layout):
    directory = _copy(run, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    flags = ("generate", "--checkpoint", directory, "--max-new-tokens", 2)
    alone, split = one_error_line(run_cli(*flags)), one_error_line(run_cli(*flags, "--nproc", "2", *layout))
    for line in (alone, split):
        assert "parameters do not match config.json" in line and "weight_scale" in line, line


def test_an_int8_directory_given_to_train_resume_is_one_error_line(run):
    directory, _, _ = run
    line = one_error_line(run_cli("train", "--out", directory / "run-int8", "--resume"))
    assert "int8 model" in line and "resume the float run" in line and str(directory / "run") in line


def test_an_int8_directory_given_to_export_is_one_error_line_saying_it_cannot_be_exported(run):
    directory, _, _ = run
    line = one_error_line(run_cli("export", directory / "run-int8", "--out", directory / "exported"))
    assert "int8 directories cannot be exported" in line and "trained" not in line and "resume" not in line
    assert f"export the float run ({directory / 'run'})" in line


def test_a_float_reader_refuses_an_int8_directory(run):
    with pytest.raises(ValueError, match="a quantized model \\(ringpipe_int8\\)"):
        GPT.from_pretrained(run[0] / "run-int8")


def test_a_family_whose_layers_quantize_differently_is_refused_by_name(tmp_path):
    from ringpipe.model.bert.config import BertConfig
    from ringpipe.model.bert.model import Bert

    Bert(BertConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)).save_pretrained(tmp_path / "bert")
    line = one_error_line(run_cli("quantize", tmp_path / "bert", "--int8"))
    assert "holds a bert model, whose layers quantize differently" in line and "gpt2" in line


def test_a_run_without_a_model_or_a_committed_checkpoint_is_one_line_saying_what_quantize_looks_for(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-00000002").mkdir(parents=True)  # never committed
    line = one_error_line(run_cli("quantize", tmp_path / "run", "--int8"))
    assert f"no checkpoint in {tmp_path / 'run'}" in line and "checkpoints/step-N" in line


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run[0] / "run-int8", tmp_path / "q")
    return tmp_path / "q"


def test_a_truncated_int8_file_is_one_error_line(run, tmp_path):
    directory = _copy(run, tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    line = one_error_line(run_cli("generate", "--checkpoint", directory, "--max-new-tokens", 2))
    assert "cannot load model" in line and "model.safetensors" in line


def _truncate(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return "model.safetensors"


def _edit_config(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_layer": 4}))
    return "config.json"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", [_truncate, _edit_config], ids=["truncated", "edited-config"])
def test_a_damaged_int8_directory_across_workers_is_one_line_without_the_remote_traceback(run, tmp_path, damage):
    directory = _copy(run, tmp_path)
    file = damage(directory)
    line = one_error_line(run_cli("generate", "--checkpoint", directory, "--max-new-tokens", 2, "--nproc", 2,
                                  "--pp", 2))
    assert file in line and "remote traceback" not in line and 'File "' not in line, line


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update({"transformer.h.1.mlp.c_fc.weight_scale": np.ones(3, np.float32)}),
     "h.1.mlp.c_fc.weight scale is float32 \\(3,\\)"),
    (lambda t: t.update({"transformer.h.0.attn.c_proj.weight": np.zeros((32, 32), np.float32)}),
     "h.0.attn.c_proj.weight is float32 \\(32, 32\\), expected int8"),
    (lambda t: t.update({"transformer.h.0.attn.c_attn.weight_scale": -np.ones(96, np.float32)}),
     "not a finite positive number"),
    (lambda t: t.pop("transformer.h.1.attn.c_attn.weight_scale"), "missing tensor"),
])
def test_an_int8_file_that_does_not_fit_its_config_names_the_tensor(run, tmp_path, damage, message):
    directory = _copy(run, tmp_path)
    tensors, metadata = load_tensors(directory / "model.safetensors")
    damage(tensors)
    metadata.pop("ringpipe.checksums", None)
    save_tensors(directory / "model.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=message):
        Int8GPT.from_pretrained(directory)


def test_outliers_found_on_the_runs_tokens_are_stored_and_computed_in_float(run, tmp_path):
    directory, tokenizer, _ = run
    summary = quantize_run(str(directory / "run"), str(tmp_path / "q"), outlier_threshold=1.0, calibration_batches=2)
    int8 = Int8GPT.from_pretrained(tmp_path / "q")
    rows = {name: w.outlier_rows.tolist() for name, w in int8.params.items() if isinstance(w, Int8Weight)}
    assert summary["outlier_rows"] == sum(map(len, rows.values())) > 0
    float_model = GPT.from_pretrained(directory / "run")
    for name, kept in rows.items():
        np.testing.assert_array_equal(int8.params[name].dequantize()[kept], float_model.params[name][kept])


def test_bench_int8_scores_float32_and_both_int8_scalings_on_the_same_val_windows(run):
    from ringpipe.tools.bench_int8 import format_table, run as bench

    result = bench(str(run[0] / "run"), max_windows=3, new_tokens=2, rounds=1, echo=lambda line: None)
    names = [v["name"] for v in result["variants"]]
    assert names == ["float32", "int8 per-channel", "int8 per-tensor"] and result["tokens"] == 3 * 32
    float32, channel, tensor = result["variants"]
    assert float32["ppl_change"] == float32["kl_from_float32"] == float32["weight_error"] == 0
    assert 0 < channel["weight_error"] < tensor["weight_error"] and channel["kl_from_float32"] > 0
    assert all(v["weight_bytes"] < result["variants"][0]["weight_bytes"] for v in result["variants"][1:])
    assert "int8 per-tensor" in format_table(result) and set(result["generation"]["tokens_per_s"]) == \
        {"float32", "int8 per-channel"}
    for v in result["variants"]:  # the interval is around the measured change (zero wide for float32)
        low, high = v["ppl_change_ci95"]
        assert low <= v["ppl_change"] + 1e-12 and v["ppl_change"] <= high + 1e-12
    assert [t["met"] for t in result["targets"]][2] == (channel["kl_from_float32"] < tensor["kl_from_float32"])
    assert "per-channel closer to float32 than per-tensor" in format_table(result)
    json.dumps(result)  # --json writes it


def int8_logits_under_tensor_parallelism(comm, directory, idx):
    """A rank's view of the int8 model at tp = comm.size: the dense model's tensor-parallel stage
    pieces, its linear weights this rank's shards of the Int8Weights -> the gathered logits."""
    from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
    from ringpipe.model.parallel.stage import Stage
    from ringpipe.model.quantization.gpt2_int8 import int8_rank_weights, load_int8_gpt

    config, params, _ = load_int8_gpt(directory)
    plan = GPT2ParallelPlan(config)
    floats = {name: np.zeros(p.shape, np.float32) if isinstance(p, Int8Weight) else p for name, p in params.items()}
    stage = Stage(plan, floats, range(config.n_layer), True, True, comm)
    for name, weight in int8_rank_weights(directory, stage.shard_table()).items():
        if isinstance(weight, Int8Weight):
            assert weight.shape[stage.shardings[name].axis] * comm.size == params[name].shape[
                stage.shardings[name].axis]
            stage.params[name] = weight
    pieces = plan.stage_pieces(stage)
    x, _ = pieces.embedding_forward(idx, None)
    for i in range(config.n_layer):
        x, _ = pieces.block_forward(i, x)
    return pieces.head_logits(x)


@pytest.mark.timeout(120)
def test_int8_weights_sharded_over_tensor_parallel_ranks_give_the_single_process_logits(run, local_cluster):
    directory, tokenizer, _ = run
    idx = np.array([tokenizer.encode("3 little pigs")])
    expected = Int8GPT.from_pretrained(directory / "run-int8").forward(idx)
    for logits in local_cluster(2).run(int8_logits_under_tensor_parallelism, str(directory / "run-int8"), idx):
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

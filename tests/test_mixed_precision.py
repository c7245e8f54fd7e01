"""Mixed precision (--dtype fp16-mixed): a float16 model, float32 master weights, dynamic loss scaling.

On the CPU with NumPy float16; tests/test_gpu.py repeats the loss-curve check on CuPy.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from ringpipe.cluster.cli import main
from ringpipe.model.nn.mixed_precision import LossScaler
from ringpipe.model.parallel.tensor_parallel import assemble_full_params
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.checkpoint_metadata import read_metadata
from ringpipe.model.training.run_dir import find_checkpoint, saved_config
from ringpipe.model.training.trainer import Trainer

STEPS = 50


def small_config(corpus, **overrides) -> TrainConfig:
    settings = dict(data=corpus, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, steps=STEPS,
                    warmup=5, lr=3e-3, min_lr=3e-4, eval_iters=1, dtype="fp16-mixed")
    settings.update(overrides)
    return TrainConfig(**settings)


def weights_of(trainer) -> dict:
    return {name: p.copy() for name, p in trainer.params_on_host().items()}


def test_fp16_mixed_loss_curve_equals_float32_within_2e_2_at_each_of_50_steps(corpus, tmp_path):
    full = Trainer.create(small_config(corpus, dtype="float32"), str(tmp_path / "float32"))
    mixed = Trainer.create(small_config(corpus), str(tmp_path / "mixed"))
    assert mixed.gpt.params["wte.weight"].dtype == np.float16
    assert mixed.master.params["wte.weight"].dtype == np.float32
    for step in range(STEPS):
        expected, got = full.train_step(step), mixed.train_step(step)
        assert not got["skipped"], step
        assert abs(got["loss"] - expected["loss"]) <= 2e-2, (step, got["loss"], expected["loss"])
    assert got["loss"] < expected_first_loss(full) - 1.0  # it learned, not just stayed put


def expected_first_loss(trainer) -> float:
    return float(np.log(trainer.tokenizer.vocab_size))


def test_an_inf_in_a_gradient_skips_the_step_and_halves_the_scale(corpus, tmp_path):
    trainer = Trainer.create(small_config(corpus), str(tmp_path / "run"))
    trainer.train_step(0)
    before, model_before = weights_of(trainer), trainer.gpt.params.flat.copy()
    moments = {name: m.copy() for name, m in trainer.optimizer.m.items()}
    updates, scale = trainer.optimizer.step_count, trainer.optimizer.scaler.scale
    real = trainer.gpt.loss_and_grads

    def with_an_inf(*args, **kwargs):  # one overflowed element, as a float16 backward produces them
        loss, grads = real(*args, **kwargs)
        grads["h.1.mlp.c_fc.weight"][0, 0] = np.inf
        return loss, grads

    trainer.gpt.loss_and_grads = with_an_inf
    metrics = trainer.train_step(1)
    assert metrics["skipped"] and metrics["grad_norm"] is None and metrics["loss_scale"] == scale
    assert trainer.optimizer.scaler.scale == scale / 2
    for name, value in before.items():
        assert np.array_equal(trainer.params_on_host()[name], value), name
    assert np.array_equal(trainer.gpt.params.flat, model_before)
    assert trainer.optimizer.step_count == updates  # AdamW's bias correction counts applied updates
    for name, m in moments.items():
        assert np.array_equal(trainer.optimizer.m[name], m), name
    assert trainer.step == 2  # the step counter counts batches consumed, skipped ones too
    trainer.gpt.loss_and_grads = real
    metrics = trainer.train_step(2)
    assert not metrics["skipped"] and trainer.optimizer.step_count == updates + 1


def test_a_scale_too_large_for_float16_overflows_and_halves_until_the_step_fits(corpus, tmp_path):
    trainer = Trainer.create(small_config(corpus), str(tmp_path / "run"))
    trainer.optimizer.scaler.scale = 2.0 ** 40  # dlogits of ~2^40 / 256 tokens: far past float16's 65504
    skipped = 0
    for step in range(30):
        metrics = trainer.train_step(step)
        if not metrics["skipped"]:
            break
        skipped += 1
    assert 1 <= skipped < 30 and trainer.optimizer.step_count == 1
    assert trainer.optimizer.scaler.scale == 2.0 ** (40 - skipped)
    assert all(np.isfinite(p).all() for p in trainer.params_on_host().values())


def test_the_scale_doubles_after_the_growth_interval_of_good_steps(corpus, tmp_path):
    trainer = Trainer.create(small_config(corpus, loss_scale_growth_interval=3), str(tmp_path / "run"))
    scales = [trainer.train_step(step)["loss_scale"] for step in range(4)]
    assert scales == [2.0 ** 16] * 3 + [2.0 ** 17]


def test_loss_scaler_halves_on_overflow_restarts_the_count_and_never_drops_below_one():
    scaler = LossScaler(scale=4.0, growth_interval=2)
    assert scaler.update(False) and scaler.good_steps == 1
    assert not scaler.update(True) and (scaler.scale, scaler.good_steps) == (2.0, 0)
    assert scaler.update(False) and scaler.scale == 2.0
    assert scaler.update(False) and scaler.scale == 4.0  # two good steps in a row since the overflow
    for _ in range(5):
        scaler.update(True)
    assert scaler.scale == 1.0


def test_checkpoint_holds_float32_master_weights_and_the_scaler_and_resumes_bitwise(corpus, tmp_path):
    config = small_config(corpus, steps=6, loss_scale_growth_interval=2, microbatches=2, dropout=0.1)
    straight = Trainer.create(config, str(tmp_path / "straight"))
    for step in range(6):
        straight.train_step(step)
    run_dir = str(tmp_path / "interrupted")
    first = Trainer.create(config, run_dir)
    for step in range(3):
        first.train_step(step)
    first.save_checkpoint()
    scale, good_steps = first.optimizer.scaler.scale, first.optimizer.scaler.good_steps
    assert (scale, good_steps) == (2.0 ** 17, 1)  # not a fresh scaler's state: it must come from the file
    checkpoint = os.path.join(run_dir, "checkpoint")
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"float32"}
    optimizer = load_file(os.path.join(checkpoint, "optimizer.safetensors"))
    assert float(optimizer["loss_scale"]) == scale and int(optimizer["loss_scale_good_steps"]) == good_steps
    with open(os.path.join(checkpoint, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"
    resumed = Trainer.resume(saved_config(run_dir), run_dir)
    assert (resumed.optimizer.scaler.scale, resumed.optimizer.scaler.good_steps) == (scale, good_steps)
    assert resumed.master.params.flat.dtype == np.float32
    for step in range(3, 6):
        resumed.train_step(step)
    for name, value in straight.params_on_host().items():
        assert np.array_equal(resumed.params_on_host()[name], value), name


def test_bf16_mixed_is_refused_with_a_one_line_reason(corpus, tmp_path):
    with pytest.raises(ValueError, match="bf16-mixed: NumPy has no bfloat16"):
        small_config(corpus, dtype="bf16-mixed").validate()
    result = CliRunner().invoke(main, ["train", "--data", corpus, "--dtype", "bf16-mixed", "--steps", "1",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1 and "bfloat16" in result.output
    assert not os.path.exists(tmp_path / "run" / "checkpoint")


def test_zero_1_with_mixed_precision_is_refused(corpus):
    with pytest.raises(ValueError, match="--zero 1 with --dtype fp16-mixed"):
        Layout(dp=2, zero=1).validate(small_config(corpus))


def test_cli_trains_with_fp16_mixed_and_logs_the_loss_scale(corpus, tmp_path):
    out = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["train", "--data", corpus, "--dtype", "fp16-mixed", "--steps", "3",
                                       "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
                                       "--batch-size", "4", "--eval-iters", "1", "--out", out])
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["loss_scale"] for m in metrics] == [2.0 ** 16] * 3 and not any(m["skipped"] for m in metrics)
    assert {str(w.dtype) for w in load_file(os.path.join(out, "model.safetensors")).values()} == {"float32"}


PARALLEL_STEPS = 5


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dp,tp,pp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_mixed_precision_in_parallel_layouts_matches_single_process_mixed(local_cluster, corpus, tmp_path,
                                                                           dp, tp, pp):
    """Not bitwise: the layouts round different float16 partial sums (tp), sum micro-batch gradients in
    another order (dp), so losses agree to the 50-step tolerance and weights to float16's resolution."""
    config = small_config(corpus, steps=PARALLEL_STEPS, batch_size=8, microbatches=2, grad_clip=0.5)
    reference = Trainer.create(config, str(tmp_path / "reference"))
    expected = [reference.train_step(step)["loss"] for step in range(PARALLEL_STEPS)]
    layout = Layout(dp=dp, tp=tp, pp=pp)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
        str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    for step in range(PARALLEL_STEPS):
        per_rank = trainers.train_step(step).result()
        losses = [m["loss"] for m in per_rank if m["loss"] is not None]
        assert abs(float(np.mean(losses)) - expected[step]) <= 2e-2, step
        assert not any(m["skipped"] for m in per_rank)
    got = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    for name, value in reference.params_on_host().items():
        assert got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], value, atol=5e-3, err_msg=name)


class ScaleSettingTrainer(ParallelTrainer):
    def set_loss_scale(self, scale: float):
        self.optimizer.scaler.scale = scale


@pytest.mark.timeout(120)
def test_an_overflow_makes_every_parallel_rank_skip_the_step_together(local_cluster, corpus, tmp_path):
    config = small_config(corpus, steps=2, microbatches=2)
    reference = Trainer.create(config, str(tmp_path / "reference"))
    layout = Layout(dp=2, pp=2)
    trainers = local_cluster(layout.world_size).spawn(
        ScaleSettingTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
        str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    before = trainers.local_params().result()
    trainers.set_loss_scale(2.0 ** 40).result()
    per_rank = trainers.train_step(0).result()
    assert all(m["skipped"] and m["grad_norm"] is None for m in per_rank)
    for old, new in zip(before, trainers.local_params().result()):
        for name in old:
            assert np.array_equal(old[name], new[name]), name
    per_rank = trainers.train_step(1).result()
    assert {m["loss_scale"] for m in per_rank} == {2.0 ** 39}


@pytest.mark.timeout(180)
def test_a_distributed_mixed_run_checkpoints_float32_weights_and_the_scaler_and_resumes(corpus, tmp_path):
    out = str(tmp_path / "run")
    common = ["train", "--data", corpus, "--dtype", "fp16-mixed", "--n-layer", "2", "--n-embd", "16", "--n-head", "2",
              "--block-size", "16", "--batch-size", "4", "--eval-iters", "1", "--nproc", "2", "--dp", "2",
              "--loss-scale-growth-interval", "2", "--out", out]
    result = CliRunner().invoke(main, [*common, "--steps", "3", "--sample", "5"])
    assert result.exit_code == 0, result.output
    metadata = read_metadata(find_checkpoint(out))  # sharded: written by the workers
    assert {t["dtype"] for t in metadata["tensors"].values()} == {"float32"}
    assert {str(w.dtype) for w in load_file(os.path.join(out, "model.safetensors")).values()} == {"float32"}
    assert metadata["optimizer"]["loss_scale"] == 2.0 ** 17  # doubled after two good steps
    assert metadata["optimizer"]["loss_scale_good_steps"] == 1
    result = CliRunner().invoke(main, [*common, "--steps", "4", "--resume"])
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["loss_scale"] for m in metrics] == [2.0 ** 16, 2.0 ** 16, 2.0 ** 17, 2.0 ** 17]


# ---- the float16 ops: statistics in float32 --------------------------------------------------------------
def test_float16_layernorm_attention_and_cross_entropy_are_float32_results_rounded_once():
    from ringpipe.model.nn import causal_attention, ops

    rng = np.random.default_rng(0)
    x = (1000 + rng.normal(size=(2, 8, 16))).astype(np.float16)  # float16 alone loses the variance here
    w, b = rng.normal(size=16).astype(np.float16), rng.normal(size=16).astype(np.float16)
    out, _ = ops.layernorm_forward(x, w, b)
    expected, _ = ops.layernorm_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32))
    assert out.dtype == np.float16 and np.array_equal(out, expected.astype(np.float16))

    qkv = rng.normal(size=(2, 8, 48)).astype(np.float16)
    y, _ = causal_attention.attention_forward(qkv, 2)
    assert y.dtype == np.float16
    assert np.array_equal(y, causal_attention.attention_forward(qkv.astype(np.float32), 2)[0].astype(np.float16))

    logits = (rng.normal(size=(2, 8, 50)) * 8).astype(np.float16)
    targets = rng.integers(0, 50, (2, 8))
    loss, cache = ops.cross_entropy_forward(logits, targets)
    assert loss == ops.cross_entropy_forward(logits.astype(np.float32), targets)[0]
    assert ops.cross_entropy_backward(cache).dtype == np.float32  # callers round dlogits once


def test_float16_model_gradients_match_float64_to_float16_precision():
    from ringpipe.model.gpt2.config import GPTConfig
    from ringpipe.model.gpt2.model import GPT

    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dtype="float64")
    idx = np.random.default_rng(1).integers(0, 50, (4, 16))
    loss64, grads64 = GPT(config, seed=0).loss_and_grads(idx, idx)
    scale = 2.0 ** 10  # as the loss scale does: keeps small gradients clear of float16's subnormals
    loss16, grads16 = GPT(dataclasses.replace(config, dtype="float16"), seed=0).loss_and_grads(idx, idx, dloss=scale)
    assert abs(loss16 - loss64) < 2e-3
    for name, g in grads64.items():
        got = grads16[name].astype(np.float64) / scale
        assert grads16[name].dtype == np.float16
        assert np.linalg.norm(got - g) <= 2e-2 * np.linalg.norm(g) + 1e-6, name

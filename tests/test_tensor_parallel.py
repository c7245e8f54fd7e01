"""Tensor parallelism (Megatron-style, with sequence parallelism) trains as the dense model does: end to end,
communication accounting, checkpoints, bad layouts."""
import dataclasses

import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.nn.optim import clip_scale
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.parallel.stage import Stage
from ringpipe.model.parallel.tensor_parallel.sharding import assemble_full_optimizer_state, assemble_full_params
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

TOLERANCE = dict(rtol=1e-7, atol=1e-9)


# ---- end-to-end: parallel training equals single-process training --------------------------------------------
STEPS = 3


class RecordingTrainer(ParallelTrainer):
    """Keeps the synchronized, unclipped gradients of the first step (keyed like local_params; a tied
    weight's only where it is summed: on the first stage)."""

    first_grads = None

    def _global_grad_norm(self, grads, *args, **kwargs):
        if self.first_grads is None:
            self.first_grads = {name: np.array(g) for name, g in grads.items()
                                if self.gradients.owns_tied or name not in self.plan.tied_params}
        return super()._global_grad_norm(grads, *args, **kwargs)

    def recorded_grads(self):
        return self.first_grads


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(dropout):
        if dropout not in cache:
            cache[dropout] = single_process_run(tmp_path_factory.mktemp("tp_reference"), dropout)
        return cache[dropout]
    return get


def single_process_run(tmp, dropout):
    """Single-process training: first-step loss, norm and gradients; parameters after STEPS steps."""
    (tmp / "corpus.txt").write_text(TEXT)
    config = TrainConfig(data=str(tmp / "corpus.txt"), n_layer=2, n_head=4, n_embd=16, block_size=8, batch_size=8,
                         microbatches=2, steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1, dtype="float64",
                         grad_clip=0.5, dropout=dropout)
    trainer = Trainer.create(config, str(tmp / "run"))
    seen = []
    update = trainer.optimizer.update
    trainer.optimizer.update = lambda params, grads, lr: (seen.append({k: g.copy() for k, g in grads.items()}),
                                                          update(params, grads, lr))
    metrics = [trainer.train_step(step) for step in range(STEPS)]
    unclipped = 1.0 / clip_scale(metrics[0]["grad_norm"], config.grad_clip)
    return {"config": config, "token_file": str(tmp / "run" / "tokens.bin"), "vocab": trainer.tokenizer.vocab_size,
            "metrics": metrics, "grads": {k: g * unclipped for k, g in seen[0].items()},
            "params": trainer.params_on_host(), "optimizer": trainer.optimizer.state_dict(),
            "checkpoint": trainer.save_checkpoint()}


E2E = [  # dp, tp, pp, schedule, sequence parallel
    (1, 2, 1, "1f1b", False),  # tp 4 without sequence parallelism runs this path on more ranks
    (1, 2, 1, "1f1b", True),
    (1, 4, 1, "1f1b", True),
    (1, 2, 2, "1f1b", False),
    (1, 2, 2, "zb-h1", True),
    (2, 2, 1, "1f1b", False),
    (2, 2, 1, "1f1b", True),
]


@pytest.mark.parametrize("dp,tp,pp,schedule,sequence_parallel", E2E)
def test_tensor_parallel_training_equals_single_process(local_cluster, references, dp, tp, pp, schedule,
                                                       sequence_parallel):
    # Dropout masks follow the micro-batch, and with dp > 1 the micro-batches are cut differently.
    reference = references(0.1 if dp == 1 else 0.0)
    config = reference["config"]
    layout = Layout(dp=dp, tp=tp, pp=pp, schedule=schedule, sequence_parallel=sequence_parallel)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(RecordingTrainer, dataclasses.asdict(config),
                                                      dataclasses.asdict(layout), reference["token_file"],
                                                      reference["vocab"])
    first = trainers.train_step(0).result()
    tables = trainers.shard_table().result()
    losses = [m["loss"] for m in first if m["loss"] is not None]
    assert np.mean(losses) == pytest.approx(reference["metrics"][0]["loss"], rel=1e-12)  # mean over dp
    assert all(m["grad_norm"] == pytest.approx(reference["metrics"][0]["grad_norm"], rel=1e-10) for m in first)
    grads = assemble_full_params(trainers.recorded_grads().result(), tables)
    assert sorted(grads) == sorted(reference["grads"])
    for name, g in reference["grads"].items():
        np.testing.assert_allclose(grads[name], g, **TOLERANCE, err_msg=f"first-step gradient of {name}")
    for step in range(1, STEPS):
        trainers.train_step(step).result()
    params = assemble_full_params(trainers.local_params().result(), tables)
    for name, value in reference["params"].items():
        np.testing.assert_allclose(params[name], value, **TOLERANCE, err_msg=f"{name} after {STEPS} steps")
    state = assemble_full_optimizer_state(trainers.optimizer_state().result(), tables)
    assert sorted(state) == sorted(reference["optimizer"])
    for name, value in reference["optimizer"].items():
        np.testing.assert_allclose(state[name], value, **TOLERANCE, err_msg=f"AdamW {name}")


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_interleaved_pipeline_with_tensor_parallel_equals_single_process(local_cluster, tmp_path,
                                                                        sequence_parallel):
    """tp 2 x pp 2 with two chunks per rank: each rank runs two tensor-parallel stages."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    config = TrainConfig(data=str(tmp_path / "corpus.txt"), n_layer=4, n_head=4, n_embd=16, block_size=8,
                         batch_size=8, microbatches=2, steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1,
                         dtype="float64", grad_clip=0.5)
    reference = Trainer.create(config, str(tmp_path / "run"))
    expected = [reference.train_step(step) for step in range(STEPS)]
    layout = Layout(tp=2, pp=2, schedule="interleaved", virtual_stages=2, sequence_parallel=sequence_parallel)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(ParallelTrainer, dataclasses.asdict(config),
                                                      dataclasses.asdict(layout), str(tmp_path / "run" / "tokens.bin"),
                                                      reference.tokenizer.vocab_size)
    for step in range(STEPS):
        metrics = trainers.train_step(step).result()
        losses = [m["loss"] for m in metrics if m["loss"] is not None]
        assert np.mean(losses) == pytest.approx(expected[step]["loss"], rel=1e-12)
        assert all(m["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-10) for m in metrics)
    params = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    for name, value in reference.params_on_host().items():
        np.testing.assert_allclose(params[name], value, **TOLERANCE, err_msg=f"{name} after {STEPS} steps")


@pytest.mark.parametrize("pp,sequence_parallel", [(1, False), (1, True), (2, True)])
def test_zero_1_with_tensor_parallel_equals_single_process(local_cluster, references, pp, sequence_parallel):
    """dp 2 x tp 2 (x pp 2) with ZeRO-1: the shards mix tp-split and tp-replicated parameters (and,
    with sequence parallelism, gradients that must still be summed over tp)."""
    reference = references(0.0)
    config = reference["config"]
    layout = Layout(dp=2, tp=2, pp=pp, schedule="1f1b", zero=1, sequence_parallel=sequence_parallel)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(ParallelTrainer, dataclasses.asdict(config),
                                                      dataclasses.asdict(layout), reference["token_file"],
                                                      reference["vocab"], bucket_bytes=2 << 10)
    for step in range(STEPS):
        metrics = trainers.train_step(step).result()
        expected = reference["metrics"][step]
        losses = [m["loss"] for m in metrics if m["loss"] is not None]  # last stage, each dp rank
        assert np.mean(losses) == pytest.approx(expected["loss"], rel=1e-12)
        assert all(m["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-10) for m in metrics)
    tables = trainers.shard_table().result()
    params = assemble_full_params(trainers.local_params().result(), tables)
    for name, value in reference["params"].items():
        np.testing.assert_allclose(params[name], value, **TOLERANCE, err_msg=f"{name} after {STEPS} steps")
    state = assemble_full_optimizer_state(trainers.optimizer_state().result(), tables)
    for name, value in reference["optimizer"].items():
        np.testing.assert_allclose(state[name], value, **TOLERANCE, err_msg=f"AdamW {name}")
    half = trainers.optimizer_state_bytes().result()
    assert max(half) < 0.75 * sum(p.nbytes * 2 for p in reference["params"].values()) / 2  # ~1/dp of a tp shard


@pytest.mark.parametrize("tp", [2, 4])
def test_a_full_checkpoint_loads_into_tensor_parallel_shards(local_cluster, references, tp):
    reference = references(0.1)
    layout = Layout(tp=tp)
    trainers = local_cluster(tp).spawn(ParallelTrainer, dataclasses.asdict(reference["config"]),
                                       dataclasses.asdict(layout), reference["token_file"], reference["vocab"])
    assert trainers.load_state(reference["checkpoint"]).result() == [STEPS] * tp
    tables = trainers.shard_table().result()
    params = assemble_full_params(trainers.local_params().result(), tables)
    state = assemble_full_optimizer_state(trainers.optimizer_state().result(), tables)
    for name, value in reference["params"].items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)
    for name, value in reference["optimizer"].items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


# ---- communication accounting -----------------------------------------------------------------------------
def analytic_bytes_per_step(config, tp, sequence_parallel):
    """Bytes one rank sends per step of a tp-only layout, with the runtime's direct algorithm (every
    rank sends its buffer, or for gathers/scatters the piece each peer needs, to each peer once)."""
    rows = config.batch_size // config.microbatches
    tokens, C, L, f64 = rows * config.model.block_size, config.model.n_embd, config.model.n_layer, 8
    activation = tokens * C * f64
    # Regions per micro-batch, forward + backward: embedding 1, two per layer each way, head 1.
    regions_count = 2 + 4 * L
    if sequence_parallel:  # all-gathers and reduce-scatters (the two halves of an all-reduce), and
        # per layer the two column-parallel inputs gathered again for their weight gradients
        per_micro = (2 * regions_count + 2 * L) * (tp - 1) * activation // tp
    else:
        per_micro = regions_count * (tp - 1) * activation
    per_micro += (tp - 1) * (tokens + 2 * tokens) * f64  # cross-entropy: max, then (sum exp, target logit)
    step = config.microbatches * per_micro + (tp - 1) * f64  # the gradient norm's sum of squares
    if sequence_parallel:  # LayerNorm and wpe gradients summed over tp
        step += (tp - 1) * (L * 4 * C + 2 * C + config.model.block_size * C) * f64
    return step


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_bytes_sent_per_step_match_the_analytic_count(local_cluster, references, sequence_parallel):
    reference = references(0.1)
    config = reference["config"]
    layout = Layout(tp=2, sequence_parallel=sequence_parallel)
    trainers = local_cluster(2).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      reference["token_file"], reference["vocab"])
    sent = [[m["bytes_sent"] for m in trainers.train_step(step).result()] for step in range(3)]
    expected = analytic_bytes_per_step(config, 2, sequence_parallel)
    for rank in range(2):
        assert sent[2][rank] - sent[1][rank] == expected
        assert sent[1][rank] - sent[0][rank] == expected


# ---- checkpoints: the full model, whatever tp wrote it ------------------------------------------------------
def tp_logits(comm, config, params, idx, sequence_parallel):
    config = GPTConfig(**config)
    stage = Stage(GPT2ParallelPlan(config), params, range(config.n_layer), True, True, comm, sequence_parallel)
    return stage.logits(idx)


def test_a_checkpoint_written_with_tp_2_gives_the_same_logits_with_tp_1_and_tp_4(local_cluster, references,
                                                                                 tmp_path):
    from ringpipe.model.gpt2.checkpoint import load_checkpoint, save_checkpoint
    reference = references(0.1)
    config = reference["config"]
    layout = Layout(tp=2, sequence_parallel=True)
    trainers = local_cluster(2).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      reference["token_file"], reference["vocab"])
    for step in range(2):
        trainers.train_step(step).result()
    full = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    gpt_config = config.gpt_config(reference["vocab"])
    save_checkpoint(tmp_path / "ckpt", full, gpt_config)
    loaded_config, loaded = load_checkpoint(tmp_path / "ckpt")
    idx = np.random.default_rng(0).integers(0, reference["vocab"], (2, 8))
    dense = GPT(loaded_config, params=loaded).forward(idx)
    for tp, sequence_parallel in ((2, False), (4, True), (4, False)):
        for logits in local_cluster(tp).run(tp_logits, loaded_config.to_dict(), loaded, idx, sequence_parallel):
            assert logits.shape == dense.shape
            np.testing.assert_allclose(logits, dense, **TOLERANCE)


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_tensor_parallel_layouts_are_refused_before_any_worker_starts(references):
    from ringpipe.model.parallel.mesh import mesh_groups, parallel_axes
    config = references(0.1)["config"]
    with pytest.raises(ValueError, match="--n-head 4 is not divisible by --tp 3"):
        Layout(tp=3).validate(config)
    with pytest.raises(ValueError, match="does not match the world size 3"):
        mesh_groups(3, parallel_axes(dp=1, tp=2, pp=1))

"""Data parallelism: bucketed gradient averaging overlapped with backward, and ZeRO-1, reproduce
single-process training on the same global batches."""
import dataclasses
import json
import os

import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.model.parallel.data_parallel import GradientBuckets, plan_buckets
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.parallel.stage import Stage
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

STEPS = 5
SMALL_BUCKETS = 4 << 10  # bytes: several buckets even for this tiny model


def config_for(tmp_path, **overrides) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    settings = dict(data=str(corpus), n_layer=3, n_head=2, n_embd=16, block_size=8, batch_size=8, microbatches=2,
                    steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1, dtype="float64", grad_clip=0.5,
                    weight_decay=0.1)
    settings.update(overrides)
    return TrainConfig(**settings)


def single_process_run(config: TrainConfig, run_dir: str, steps: int = STEPS):
    trainer = Trainer.create(config, run_dir)
    metrics = [trainer.train_step(step) for step in range(steps)]
    return trainer, metrics, trainer.params_on_host()


def spawn(local_cluster, config, layout: Layout, run_dir: str, vocab_size: int, bucket_bytes=SMALL_BUCKETS):
    layout.validate(config)
    cluster = local_cluster(layout.world_size)
    trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                             os.path.join(run_dir, "tokens.bin"), vocab_size, bucket_bytes=bucket_bytes)
    return cluster, trainers


def full_params(trainers) -> dict:
    full = {}
    for params in trainers.local_params().result():
        for name, value in params.items():
            if name in full:
                np.testing.assert_array_equal(full[name], value)  # replicas agree bitwise
            full[name] = value
    return full


def assert_same_params(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_float64_parameters_equal_single_process_after_five_steps(local_cluster, tmp_path, dp, microbatches, zero):
    config = config_for(tmp_path, microbatches=microbatches)
    reference, expected_metrics, expected = single_process_run(config, str(tmp_path / "run"))
    _, trainers = spawn(local_cluster, config, Layout(dp=dp, zero=zero), str(tmp_path / "run"),
                        reference.tokenizer.vocab_size)
    for step in range(STEPS):
        metrics = trainers.train_step(step).result()
        # The clipping norm is the true global one, and clipping is active in this run.
        assert {m["grad_norm"] for m in metrics} == {metrics[0]["grad_norm"]}
        np.testing.assert_allclose(metrics[0]["grad_norm"], expected_metrics[step]["grad_norm"], rtol=1e-7)
        assert metrics[0]["grad_norm"] > config.grad_clip
    assert_same_params(full_params(trainers), expected)


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_float32_losses_agree_with_single_process(local_cluster, tmp_path, dp, microbatches, zero):
    config = config_for(tmp_path, dtype="float32", microbatches=microbatches)
    reference, expected_metrics, _ = single_process_run(config, str(tmp_path / "run"))
    _, trainers = spawn(local_cluster, config, Layout(dp=dp, zero=zero), str(tmp_path / "run"),
                        reference.tokenizer.vocab_size)
    for step in range(STEPS):
        loss = np.mean([m["loss"] for m in trainers.train_step(step).result()])
        np.testing.assert_allclose(loss, expected_metrics[step]["loss"], rtol=1e-4)


@pytest.mark.parametrize("pp,schedule,v", [(2, "1f1b", 1), (1, "interleaved", 2), (2, "zb-h1", 1)])
def test_zero_with_pipeline_stages_and_tied_embedding_equals_single_process(local_cluster, tmp_path, pp, schedule,
                                                                              v):
    config = config_for(tmp_path, n_layer=4)
    reference, _, expected = single_process_run(config, str(tmp_path / "run"))
    _, trainers = spawn(local_cluster, config, Layout(dp=2, pp=pp, schedule=schedule, virtual_stages=v, zero=1),
                        str(tmp_path / "run"), reference.tokenizer.vocab_size)
    for step in range(STEPS):
        trainers.train_step(step).result()
    assert_same_params(full_params(trainers), expected)


# ---- buckets ---------------------------------------------------------------------------------------
def test_buckets_follow_readiness_order_with_the_tied_embedding_alone_and_padding():
    shapes = {"ln_f.weight": (4,), "wte.weight": (10, 4), "wpe.weight": (8, 4), "h.1.w": (4, 4), "h.1.b": (4,),
              "h.0.w": (4, 4), "h.0.b": (3,)}
    groups = [["ln_f.weight", "wte.weight"], ["wpe.weight", "wte.weight"], ["h.1.w", "h.1.b"], ["h.0.w", "h.0.b"]]
    buckets, offsets = plan_buckets(groups, shapes, itemsize=8, bucket_bytes=20 * 8, pad_to=4,
                                    tied=("wte.weight",))
    assert [b.names for b in buckets] == [("ln_f.weight",), ("wpe.weight",), ("wte.weight",),
                                          ("h.1.w", "h.1.b"), ("h.0.w", "h.0.b")]
    assert [b.size for b in buckets] == [4, 32, 40, 20, 20]  # h.0: 19 elements padded to 20
    assert offsets["h.1.b"] == buckets[3].start + 16 and offsets["h.0.w"] == buckets[4].start


class _OneOfTwoRanks:  # GradientBuckets only asks a communicator for its size and rank, and a barrier, when built
    size, rank = 2, 0

    def barrier(self):
        pass


def test_buckets_of_a_stage_start_with_the_head_and_the_last_layer():
    config = GPTConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=32, block_size=16)
    stage = Stage(GPT2ParallelPlan(config), init_params(config), range(4), True, True)
    gradients = GradientBuckets({0: stage}, _OneOfTwoRanks(), bucket_bytes=20 << 10)
    layers = [sorted({int(n.split(".")[1]) for n in b.names if n.startswith("h.")}, reverse=True)
              for b in gradients.buckets]
    assert gradients.buckets[0].names[:4] == ("ln_f.weight", "ln_f.bias", "wpe.weight", "wte.weight")
    # With a tie group (pipeline stages), the tied embedding has a bucket of its own.
    tied = GradientBuckets({0: Stage(GPT2ParallelPlan(config), init_params(config), range(4), True, True)},
                           _OneOfTwoRanks(), tie_comm=_OneOfTwoRanks(), bucket_bytes=20 << 10)
    assert tied.buckets[1].names == ("wte.weight",)
    assert [layer for bucket in layers for layer in bucket] == sorted(
        [layer for bucket in layers for layer in bucket], reverse=True)  # last layer first
    assert len(gradients.buckets) > 4
    # Stage parameters and gradients are views into the flat buffers, so reducing a bucket needs no copy.
    assert all(np.shares_memory(stage.grads[n], gradients.flat_grads) for n in stage.grads)
    assert all(np.shares_memory(stage.params[n], gradients.flat_params) for n in stage.params)


def test_a_stage_lays_its_buckets_out_in_the_order_its_last_backward_reports_them():
    """The last micro-batch's weight backward reports a block's LayerNorms, then a linear at a time,
    the largest first (block_backward_weight_parts); the buffers follow that order, and the last
    group reported (the first block's smallest linear) has a bucket of its own, so that what is left
    to reduce after backward is that linear alone."""
    config = GPTConfig(vocab_size=65, n_layer=3, n_head=4, n_embd=32, block_size=16)
    stage = Stage(GPT2ParallelPlan(config), init_params(config), range(3), True, True)
    reported = []
    gradients = GradientBuckets({0: stage}, _OneOfTwoRanks(), bucket_bytes=8 << 10)
    stage.on_grads_final = lambda names: reported.append(list(names))  # (what GradientBuckets hears)
    idx = np.random.default_rng(0).integers(0, 65, (2, 16))
    loss, caches = stage.forward(idx, idx)
    _, deferred = stage.backward_input(caches, 1.0, last=True)
    stage.backward_weight(deferred, last=True)
    assert sorted(name for group in reported for name in group) == sorted(stage.params)
    assert [set(group) for group in reported] == [set(group) for group in stage.grad_groups_in_ready_order()]
    for earlier, later in zip(reported, reported[1:]):  # the buffers' order
        assert max(map(gradients.offsets.get, earlier)) < min(map(gradients.offsets.get, later))
    assert reported[-1] == ["h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias"]
    assert gradients.buckets[-1].names == ("h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias")
    assert reported[-5:-1] == [["h.0.ln_2.weight", "h.0.ln_2.bias", "h.0.ln_1.weight", "h.0.ln_1.bias"],
                               ["h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias"],
                               ["h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"],
                               ["h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias"]]


def test_a_tensor_parallel_first_stage_plans_its_embedding_before_its_blocks_as_it_reports_them():
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=16)
    stage = Stage(GPT2ParallelPlan(config), init_params(config), range(2), True, False, tp_comm=_OneOfTwoRanks())
    gradients = GradientBuckets({0: stage}, _OneOfTwoRanks(), tie_comm=_OneOfTwoRanks(), bucket_bytes=8 << 10)
    assert stage.grad_groups_in_ready_order()[0] == ["wpe.weight", "wte.weight"]
    assert gradients.buckets[-1].names == ("h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias")
    assert ("wte.weight",) in [b.names for b in gradients.buckets]  # tied: alone, with a tie group


def test_the_last_group_reported_starts_a_bucket_of_its_own():
    shapes = {"a": (4,), "b": (4,), "c": (2,)}
    buckets, _ = plan_buckets([["a"], ["b"], ["c"]], shapes, itemsize=8, bucket_bytes=1 << 20)
    assert [b.names for b in buckets] == [("a", "b"), ("c",)]
    # A name reported again later is final at its last report: it belongs to the group it ends in.
    buckets, _ = plan_buckets([["a", "c"], ["b"], ["c"]], shapes, itemsize=8, bucket_bytes=1 << 20)
    assert [b.names for b in buckets] == [("a", "b"), ("c",)]
    assert [b.names for b in plan_buckets([["a", "b"]], shapes, 8, 1 << 20)[0]] == [("a", "b")]


def traced_step(local_cluster, tmp_path, zero: int):
    """Rank 0's trace of step 1 of a dp=2, 2-micro-batch run: backward spans by micro-batch, comm spans
    (name, start, end, bytes), bucket launch times, and the step's metrics."""
    config = config_for(tmp_path, microbatches=2)
    run_dir = str(tmp_path / "run")
    reference = Trainer.create(config, run_dir)
    cluster, trainers = spawn(local_cluster, config, Layout(dp=2, zero=zero), run_dir,
                              reference.tokenizer.vocab_size)
    trainers.train_step(0).result()
    cluster.start_trace()
    metrics = trainers.train_step(1).result()
    cluster.stop_trace(str(tmp_path / "trace"))
    with open(tmp_path / "trace" / "trace-rank0.json") as f:
        events = json.load(f)["events"]
        launches = [e[4] for e in events if e[0] == "i" and e[1] == "bucket launch"]
        events = [e for e in events if e[0] == "X"]
    backward = {e[6]["microbatch"]: (e[4], e[4] + e[5]) for e in events if e[1] == "backward"}
    comm = [(e[1], e[4], e[4] + e[5], e[6]["bytes"]) for e in events if e[2] == "comm"]
    return backward, comm, launches, metrics[0]


def test_bucket_all_reduces_start_during_the_last_microbatch_backward(local_cluster, tmp_path):
    backward, comm, launches, metrics = traced_step(local_cluster, tmp_path, zero=0)
    last_start, last_end = backward[1]
    buckets = metrics["data_parallel"]["buckets"]
    assert len([c for c in comm if c[0] == "all_reduce"]) == len(launches) == buckets > 2
    assert all(last_start <= t < last_end for t in launches)  # every bucket is final before backward ends
    assert all(start >= last_start for _, start, _, _ in comm)
    assert metrics["data_parallel"]["overlapped_s"] > 0


def test_microbatches_before_the_last_do_not_communicate(local_cluster, tmp_path):
    for zero in (0, 1):
        backward, comm, _, _ = traced_step(local_cluster, tmp_path / f"zero{zero}", zero=zero)
        assert comm and all(start >= backward[1][0] for _, start, _, _ in comm)
        assert sum(nbytes for _, start, _, nbytes in comm if start < backward[1][0]) == 0


def test_zero_reduce_scatters_gradients_and_all_gathers_parameters(local_cluster, tmp_path):
    _, comm, _, metrics = traced_step(local_cluster, tmp_path, zero=1)
    names = [c[0] for c in comm]
    buckets = metrics["data_parallel"]["buckets"]
    assert names.count("reduce_scatter") == buckets and names.count("all_gather") == buckets
    assert names.count("all_reduce") == 1  # the squared gradient norm


# ---- ZeRO-1 optimizer state ----------------------------------------------------------------------------
def test_zero_optimizer_memory_per_rank_is_one_over_dp(local_cluster, tmp_path):
    config = config_for(tmp_path)
    reference = Trainer.create(config, str(tmp_path / "run"))
    vocab = reference.tokenizer.vocab_size
    full = sum(m.nbytes + v.nbytes for m, v in zip(reference.optimizer.m.values(), reference.optimizer.v.values()))
    for dp in (1, 2, 4):
        _, trainers = spawn(local_cluster, config, Layout(dp=dp, zero=1), str(tmp_path / "run"), vocab)
        per_rank = trainers.optimizer_state_bytes().result()
        padding = 2 * 8 * dp * 16  # at most dp-1 pad elements per bucket, m and v; this model has < 16 buckets
        assert all(full / dp <= b <= full / dp + padding for b in per_rank), (dp, full, per_rank)


@pytest.mark.parametrize("resume_dp,resume_zero", [(1, 0), (4, 1)])
def test_zero_checkpoint_resumes_with_another_dp_size(local_cluster, tmp_path, resume_dp, resume_zero):
    config = config_for(tmp_path)
    reference, _, expected = single_process_run(config, str(tmp_path / "reference"))
    vocab = reference.tokenizer.vocab_size
    run = Trainer.create(config, str(tmp_path / "run"))
    _, trainers = spawn(local_cluster, config, Layout(dp=2, zero=1), str(tmp_path / "run"), vocab)
    for step in range(2):
        trainers.train_step(step).result()
    # The checkpoint is the single-process format: full weights and full AdamW moments by name.
    for name, value in full_params(trainers).items():
        run.gpt.params[name][...] = value
    states = trainers.optimizer_state().result()
    for state in states[1:]:
        assert all(np.array_equal(state[key], states[0][key]) for key in state)  # gathered on every rank
    run.optimizer.load_state_dict(states[0])
    run.step = 2
    checkpoint = run.save_checkpoint()
    _, resumed = spawn(local_cluster, config, Layout(dp=resume_dp, zero=resume_zero), str(tmp_path / "run"), vocab)
    assert set(resumed.load_state(os.path.abspath(checkpoint)).result()) == {2}
    for step in range(2, STEPS):
        resumed.train_step(step).result()
    assert_same_params(full_params(resumed), expected)


# ---- bad input --------------------------------------------------------------------------------------
def test_global_batch_not_divisible_by_dp_times_microbatches_is_a_clear_error(tmp_path):
    config = config_for(tmp_path, batch_size=8, microbatches=4)
    with pytest.raises(ValueError, match=r"global batch 8 is not divisible by dp × microbatches = 4 × 4"):
        Layout(dp=4).validate(config)

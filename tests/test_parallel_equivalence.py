"""Every parallel layout reproduces single-process training on the same global batches (float64)."""
import dataclasses

import numpy as np
import pytest

from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

STEPS = 3


def config_for(tmp_path, **overrides) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    settings = dict(data=str(corpus), n_layer=4, n_head=4, n_embd=16, block_size=8, batch_size=16, microbatches=4,
                    steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1, dtype="float64", grad_clip=0.5)
    settings.update(overrides)
    return TrainConfig(**settings)


def reference_params(config: TrainConfig, run_dir: str):
    trainer = Trainer.create(config, run_dir)
    for step in range(STEPS):
        trainer.train_step(step)
    return trainer, trainer.params_on_host()


def gather_full(per_rank: list[dict]) -> dict:
    full = {}
    for params in per_rank:
        for name, value in params.items():
            if name in full:
                np.testing.assert_array_equal(full[name], value)  # replicas agree bitwise
            full[name] = value
    return full


CASES = [  # (dp, tp, pp, schedule, virtual stages)
    (1, 1, 2, "gpipe", 1),
    (1, 1, 4, "1f1b", 1),
    (1, 1, 2, "interleaved", 2),
    (1, 1, 4, "zb-h1", 1),
    (2, 1, 2, "1f1b", 1),
    (2, 1, 1, "1f1b", 1),
    (4, 1, 1, "1f1b", 1),
    (1, 1, 1, "interleaved", 2),
]


@pytest.mark.parametrize("dp,tp,pp,schedule,v", CASES)
def test_parallel_training_equals_single_process(local_cluster, tmp_path, dp, tp, pp, schedule, v):
    config = config_for(tmp_path)
    reference, expected = reference_params(config, str(tmp_path / "reference"))
    layout = Layout(dp=dp, tp=tp, pp=pp, schedule=schedule, virtual_stages=v)
    layout.validate(config)
    cluster = local_cluster(layout.world_size)
    trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                             str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    for step in range(STEPS):
        trainers.train_step(step).result()
    got = gather_full(trainers.local_params().result())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)


def test_an_explicit_layer_split_trains_the_same_model(local_cluster, tmp_path):
    config = config_for(tmp_path)
    reference, expected = reference_params(config, str(tmp_path / "reference"))
    layout = Layout(pp=2, schedule="1f1b", split=[3, 1])
    layout.validate(config)
    trainers = local_cluster(2).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    for step in range(STEPS):
        trainers.train_step(step).result()
    owned = [sorted(p) for p in trainers.local_params().result()]
    assert sum(name.startswith("h.") for name in owned[0]) == 3 * 12  # three blocks on the first stage
    got = gather_full(trainers.local_params().result())
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_full_mesh_dp2_tp2_pp2_equals_single_process(local_cluster, tmp_path, schedule):
    from ringpipe.model.parallel.tensor_parallel import assemble_full_params

    config = config_for(tmp_path, n_head=2)
    reference, expected = reference_params(config, str(tmp_path / "reference"))
    layout = Layout(dp=2, tp=2, pp=2, schedule=schedule)
    layout.validate(config)
    trainers = local_cluster(8).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    for step in range(STEPS):
        trainers.train_step(step).result()
    got = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("schedule,expected", [("1f1b", lambda p, m, stage: p - stage),
                                               ("gpipe", lambda p, m, stage: m)])
def test_peak_in_flight_microbatches_in_a_real_run(local_cluster, tmp_path, schedule, expected):
    config = config_for(tmp_path, microbatches=8)
    reference = Trainer.create(config, str(tmp_path / "reference"))
    layout = Layout(pp=4, schedule=schedule)
    trainers = local_cluster(4).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    metrics = trainers.train_step(0).result()
    for stage, rank_metrics in enumerate(metrics):
        peak = rank_metrics["peak_in_flight"][str(stage)]
        if schedule == "1f1b":
            assert peak <= expected(4, 8, stage)
        else:
            assert peak == expected(4, 8, stage)


def test_a_traced_pipeline_step_records_spans_and_activation_counters(local_cluster, tmp_path):
    import json

    config = config_for(tmp_path)
    reference = Trainer.create(config, str(tmp_path / "reference"))
    cluster = local_cluster(2)
    trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config),
                             dataclasses.asdict(Layout(pp=2, schedule="zb-h1")),
                             str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    cluster.start_trace()
    trainers.train_step(0).result()
    paths = cluster.stop_trace(str(tmp_path / "trace"))
    events = json.load(open(sorted(paths)[0]))["events"]
    names = {e[1] for e in events if e[0] == "X"}
    assert {"forward", "backward_input", "backward_weight", "optimizer", "send", "recv"} <= names
    forwards = [e for e in events if e[1] == "forward"]
    assert sorted(e[6]["microbatch"] for e in forwards) == list(range(config.microbatches))
    counters = [e[6]["activation bytes"] for e in events if e[0] == "C" and e[1] == "activation bytes"]
    assert max(counters) > 0 and counters[-1] == 0

"""No process holds the whole model: each rank only its shards (by the bytes it reports, checked
against what tracemalloc sees), and the driver of a run no parameter array at all."""
import dataclasses
import gc
import tracemalloc

import numpy as np
import pytest

from ringpipe.cluster.distributed_train import DistributedRun
from ringpipe.runtime import Cluster
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.layout_report import describe_layout, stage_parameter_elements
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.run_setup import RunSetup
from tests.conftest import TEXT

MiB = 1 << 20


def small_config(tmp_path, **overrides) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    settings = dict(data=str(corpus), n_layer=4, n_head=4, n_embd=256, block_size=16, batch_size=4, microbatches=2,
                    steps=2, eval_iters=1, dtype="float32")
    settings.update(overrides)
    return TrainConfig(**settings)


def start_tracing(comm):
    tracemalloc.start()


def state_bytes(report: dict) -> int:
    return report["weights"] + report["gradients"] + report["optimizer"] + report["activations"] + report["communication"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [Layout(tp=2, pp=2), Layout(dp=2, pp=2, zero=1)], ids=["tp2xpp2", "dp2xpp2-zero1"])
def test_each_rank_holds_only_its_shards(tmp_path, layout):
    config = small_config(tmp_path)
    setup = RunSetup.create(config, str(tmp_path / "run"))
    setup.write_token_file()
    # A cluster of its own: a pooled one holds channels of earlier tests (counted in "communication",
    # allocated before the tracing) and may close some of them meanwhile.
    with Cluster(layout.world_size) as cluster:
        cluster.run(start_tracing)  # before the rank builds anything
        trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                 setup.token_file, setup.vocab_size)
        for step in range(2):
            trainers.train_step(step).result()
        trainers.evaluate().result()
        reports = trainers.memory_report().result()
    plan = GPT2ParallelPlan(config.model_config(setup.vocab_size))
    model_weights = 4 * sum(int(np.prod(shape)) for shape in plan.param_shapes().values())
    _, stage_elements = stage_parameter_elements(plan, layout)
    replica = [r for r in reports if r["coordinates"]["dp"] == 0]
    for report in reports:
        stage = report["coordinates"]["pp"]
        # a tp shard of its stage (LayerNorms and biases replicated over tp: a little more)
        assert 4 * stage_elements[stage] / layout.tp <= report["weights"] <= 1.1 * 4 * stage_elements[stage] / layout.tp
        optimizer = (3 if layout.zero else 2) * report["weights"] / (layout.dp if layout.zero else 1)  # ZeRO: + decay rates
        assert abs(report["optimizer"] - optimizer) <= 0.1 * optimizer, report
        # near-equal state on every rank of a replica (the split balances bytes)
        mean = sum(r["weights"] + r["optimizer"] for r in replica) / len(replica)
        assert abs(report["weights"] + report["optimizer"] - mean) <= 0.1 * mean, (report, mean)
        # the accounting is what the process really holds (NumPy buffers as tracemalloc sees them) ...
        assert report["communication"] > 0  # (its groups' same-host channels: scratch for the small rounds)
        current, peak = report["traced"]
        assert state_bytes(report) <= current <= 1.1 * state_bytes(report) + 3 * MiB, report  # + imports, buffers
        # ... and no moment (starting included) held much more: never the whole model, nor a stage unsharded
        assert peak <= 1.5 * state_bytes(report) + 3 * MiB, (report, model_weights)


def parameter_arrays_alive(shapes) -> list:
    """NumPy arrays the garbage collector can reach in this process with a parameter's shape."""
    wanted = {tuple(shape) for shape in shapes.values() if len(shape) == 2}
    return [type(o).__name__ + str(o.shape) for o in gc.get_objects()
            if issubclass(type(o), np.ndarray) and tuple(o.shape) in wanted]  # (isinstance asks o.__class__:
    # a deprecated module attribute of torch's warns then)


@pytest.mark.timeout(180)
def test_the_driver_holds_no_parameter_array_while_training_evaluating_checkpointing_exporting_and_sampling(
        tmp_path):
    config = small_config(tmp_path, n_layer=8)  # 25 MiB of weights: the driver's own ~0.5 MiB is far below 5 %
    out, reported, peaks = str(tmp_path / "run"), [], {}

    def phase(name):  # the driver's traced peak since the previous phase
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        run = DistributedRun(config, Layout(pp=2), out, report=reported.append)
        try:
            plan_shapes = GPT2ParallelPlan(config.model_config(run.setup.vocab_size)).param_shapes()
            for step in range(2):
                run.train_step(step)
            assert "val_loss" in run.evaluate()
            phase("training and evaluating")
            run.save_checkpoint()
            phase("checkpointing")
            run.save_model()  # streamed from the checkpoint's pieces
            phase("exporting")
            alive = parameter_arrays_alive(plan_shapes)
            # The walk's list of every object is the test's, not the driver's: ~3 MB once an earlier
            # test has imported torch (test_checkpoint does), which the sampling phase's peak would count.
            tracemalloc.reset_peak()
            sample = run.sample(8)
            phase("sampling")
        finally:
            run.close()
    finally:
        tracemalloc.stop()
    weights = 4 * sum(int(np.prod(shape)) for shape in plan_shapes.values())
    largest = 4 * max(int(np.prod(shape)) for shape in plan_shapes.values())
    assert alive == []
    # Starting the workers, tokenizing, metrics, messages, the checkpoint's metadata (~1 MiB for these
    # 100 tensors): a small part of the weights, whatever the model's width; the export holds one chunk
    # of one tensor (at most 32 MiB; here the largest tensor, 1 MiB) and its converted copies.
    for name, peak in peaks.items():
        assert peak < 0.1 * weights + (4 * largest if name == "exporting" else 0), (name, peaks, weights)
    # The sample is the saved model's, as a single-process run samples its own (prompt "\n", the run's seed).
    gpt, tokenizer = GPT.from_pretrained(out), load_tokenizer(out)
    ids = gpt.generate(gpt.xp.asarray(tokenizer.encode("\n"))[None, :], 8, seed=config.seed)
    assert sample == tokenizer.decode(ids[0]).rstrip("\n")
    assert reported == [describe_layout(GPT2ParallelPlan(config.model_config(run.setup.vocab_size)), Layout(pp=2),
                                        "float32")]
    assert "(balanced by weight and AdamW bytes)" in reported[0]

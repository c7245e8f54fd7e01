"""Validation loss computed by the workers under the run's layout equals single-process evaluation."""
import dataclasses

import pytest

from ringpipe.model.families import family, special_ids
from ringpipe.model.training.evaluation import mean_validation_loss
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.test_bert_training import bert_config
from tests.test_parallel_equivalence import config_for

LAYOUTS = [  # (dp, tp, pp, schedule, virtual stages, sequence parallel)
    (2, 1, 1, "1f1b", 1, False),
    (1, 2, 1, "1f1b", 1, True),
    (1, 1, 2, "interleaved", 2, False),
    (2, 2, 2, "1f1b", 1, False),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,tp,pp,schedule,v,sequence_parallel", LAYOUTS)
def test_distributed_validation_loss_equals_single_process(local_cluster, tmp_path, dp, tp, pp, schedule, v,
                                                           sequence_parallel):
    config = config_for(tmp_path, n_head=2, eval_iters=2)
    reference = Trainer.create(config, str(tmp_path / "reference"))
    reference.train_step(0)
    layout = Layout(dp=dp, tp=tp, pp=pp, schedule=schedule, virtual_stages=v, sequence_parallel=sequence_parallel)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
        str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    trainers.train_step(0).result()  # evaluated after a step, so the weights are not the init's
    got = mean_validation_loss(trainers.evaluate().result())["val_loss"]
    assert got == pytest.approx(reference.evaluate()["val_loss"], rel=0, abs=1e-10)


def test_evaluation_keeps_no_activations_and_leaves_training_unchanged(local_cluster, tmp_path):
    config = config_for(tmp_path, eval_iters=2)
    reference = Trainer.create(config, str(tmp_path / "reference"))
    layout = Layout(pp=2)
    trainers = local_cluster(2).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size)
    before = trainers.evaluate().result()
    after_evaluation = trainers.memory_report().result()
    assert [report["activations"] for report in after_evaluation] == [0, 0]
    assert trainers.evaluate().result() == before  # evaluation changed no weight
    for step in range(2):
        assert [m["loss"] for m in trainers.train_step(step).result()][-1] == pytest.approx(
            reference.train_step(step)["loss"], abs=1e-10)
    after_training = trainers.memory_report().result()
    for evaluation, training in zip(after_evaluation, after_training):
        # one piece's cache at a time, against all pieces (two blocks and more) of the micro-batches in flight
        assert 0 < 2 * evaluation["activations_peak"] < training["activations_peak"], (evaluation, training)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [dict(dp=2), dict(pp=2)], ids=["dp2", "pp2"])
def test_bert_validation_loss_under_a_layout_equals_single_process(local_cluster, tmp_path, layout):
    config = bert_config(tmp_path, eval_iters=2)  # another family: the masked-token loss of its objective
    reference = Trainer.create(config, str(tmp_path / "run"))
    layout = Layout(**layout)
    trainers = local_cluster(layout.world_size).spawn(
        ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout), str(tmp_path / "run" / "tokens.bin"),
        reference.tokenizer.vocab_size, special_ids=special_ids(reference.tokenizer, family("bert")))
    got = mean_validation_loss(trainers.evaluate().result())["val_loss"]
    assert got == pytest.approx(reference.evaluate()["val_loss"], rel=0, abs=1e-10)

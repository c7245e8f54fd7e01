"""T5 under data, ZeRO-1, tensor and pipeline parallelism equals single-process training (float64)."""
import dataclasses

import numpy as np
import pytest

from ringpipe.model.families import family, special_ids
from ringpipe.model.parallel.tensor_parallel import assemble_full_params
from ringpipe.model.t5.family import encoder_decoder_split
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

STEPS = 2


@pytest.fixture(scope="module")
def t5_reference(tmp_path_factory):
    """reference(dropout): a tiny gated-GELU T5 trained two steps in one process (float64), and its
    run directory, made once per dropout rate."""
    made = {}

    def reference(dropout):
        if dropout not in made:
            tmp_path = tmp_path_factory.mktemp("t5")
            corpus = tmp_path / "corpus.txt"
            corpus.write_text(TEXT)
            config = TrainConfig(family="t5", data=str(corpus), n_layer=2, n_head=2, n_embd=8,
                                 block_size=20, feed_forward_proj="gated-gelu", n_inner=12,
                                 dropout=dropout, batch_size=8, microbatches=2, steps=STEPS, warmup=1,
                                 lr=1e-2, eval_iters=1, dtype="float64", grad_clip=0.5)
            trainer = Trainer.create(config, str(tmp_path / "reference"))
            for step in range(STEPS):
                trainer.train_step(step)
            made[dropout] = config, trainer, trainer.params_on_host(), tmp_path
        return made[dropout]
    return reference


# Dropout masks are drawn per micro-batch, so they are the single process's where the micro-batches
# are (tensor and pipeline parallelism); data parallelism splits them (as for GPT-2): no dropout there.
@pytest.mark.timeout(240)
@pytest.mark.parametrize("dp,tp,pp,zero,schedule,dropout", [
    (1, 2, 2, 0, "1f1b", 0.1),  # heads split in all three attentions; an encoder stage, a decoder stage
    (2, 1, 2, 1, "1f1b", 0.0),  # data parallel with ZeRO-1, over the same two stages
    (1, 1, 4, 0, "zb-h1", 0.1),  # each stack on two stages
])
def test_t5_parallel_training_equals_single_process(local_cluster, t5_reference, dp, tp, pp, zero,
                                                    schedule, dropout):
    config, reference, expected, tmp_path = t5_reference(dropout)
    split = encoder_decoder_split(config.model, pp, pp // 2) if pp > 1 else None
    layout = Layout(dp=dp, tp=tp, pp=pp, zero=zero, schedule=schedule, split=split)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
        str(tmp_path / "reference" / "tokens.bin"), reference.tokenizer.vocab_size,
        special_ids=special_ids(reference.tokenizer, family("t5")))
    for step in range(STEPS):
        trainers.train_step(step).result()
    got = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-11, err_msg=name)


def test_encoder_stages_put_the_encoder_first_and_must_leave_the_decoder_a_stage():
    from ringpipe.model.t5.family import T5Options
    options = T5Options(n_layer=3, n_decoder_layer=2)
    assert encoder_decoder_split(options, 4, 2) == [2, 1, 1, 1]
    with pytest.raises(ValueError, match="--encoder-stages 4 leaves the decoder no stage of the 4"):
        encoder_decoder_split(options, 4, 4)
    with pytest.raises(ValueError, match="3 decoder stages but the decoder has 2 layers"):
        encoder_decoder_split(options, 4, 1)

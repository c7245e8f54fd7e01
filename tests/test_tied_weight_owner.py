"""A tied weight (GPT-2's wte: embedding and LM head) under pipeline parallelism: the first and the
last stage both hold it, but only the first keeps its AdamW moments and updates it; the last stage
sends its gradient there and gets the updated weight back. (That results still equal single-process
training is test_parallel_equivalence.py's; that checkpoints move between layouts, test_sharded_checkpoint.py's.)"""
import dataclasses

import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.memory import Candidate, layout_memory
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

TIED = "wte.weight"


class TiedTrainer(ParallelTrainer):
    def tied_state(self) -> dict:
        state = self.optimizer_state()  # (collective over dp with ZeRO-1: every rank is asked)
        return {"pp": self.mesh.pp_rank, "moments": sorted(key for key in state if key.endswith(TIED)),
                "weight": self.local_params()[TIED], "moment_bytes": self.optimizer_state_bytes(),
                "weight_bytes": self.gradients.flat_params.nbytes, "tied_bytes": self.params[TIED].nbytes}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [Layout(pp=2), Layout(dp=2, pp=2, zero=1)], ids=["pp2", "dp2-pp2-zero1"])
def test_only_the_first_stage_keeps_adam_moments_of_the_tied_weight_and_both_hold_the_same_weight(
        local_cluster, tmp_path, layout):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=4,
                         microbatches=2, steps=2, warmup=0, dtype="float64", weight_decay=0.1)
    reference = Trainer.create(config, str(tmp_path / "run"))
    trainers = local_cluster(layout.world_size).spawn(
        TiedTrainer, dataclasses.asdict(config), dataclasses.asdict(layout), str(tmp_path / "run" / "tokens.bin"),
        reference.tokenizer.vocab_size)
    for step in range(2):
        trainers.train_step(step).result()
    ranks = trainers.tied_state().result()
    for rank in ranks:
        assert rank["moments"] == ([f"m.{TIED}", f"v.{TIED}"] if rank["pp"] == 0 else []), rank["pp"]
        np.testing.assert_array_equal(rank["weight"], ranks[0]["weight"])  # the updated weight came back
        # the last stage's moments are those of everything it holds but the tied weight
        held = rank["weight_bytes"] - (rank["tied_bytes"] if rank["pp"] == 1 else 0)
        assert rank["moment_bytes"] == pytest.approx(2 * held / (layout.dp if layout.zero else 1), rel=0.01)
    assert not np.array_equal(ranks[0]["weight"], reference.params_on_host()[TIED])  # it was trained


def test_gpt2_medium_ranks_keep_weights_and_moments_within_8_percent_of_their_share_at_tp2_pp2():
    """The proof run's shape (`ringpipe bench memory`): each rank's weights + AdamW moments against
    1/(tp·pp) of the model's, by the planner's inventory (tests/test_planner_memory.py holds it to what
    ranks report). With the moments of wte on both stages the first stage was 15 % over."""
    config = GPTConfig(n_layer=24, n_embd=1024, n_head=16, block_size=256, vocab_size=50257, dtype="float32")
    inventory = GPT2Inventory(config)
    model = 4 * sum(int(np.prod(shape)) for shape in inventory.param_shapes().values())
    share = 3 * model / 4  # weights and two moments, over tp 2 × pp 2
    for rank in layout_memory(inventory, Candidate(1, 2, 2, "1f1b", 1, 2, 0, False, False), batch_size=2):
        assert abs((rank.weights + rank.optimizer) / share - 1) <= 0.08, rank

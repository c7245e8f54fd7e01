"""The planner's memory inventory equals the bytes ranks of real runs hold (weights, gradients,
optimizer state, and each stage's peak of cached activations as `ActivationMemory` measures it), so
a change to what the model keeps must change the planner too."""
import dataclasses

import pytest

from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.memory import Candidate, layout_memory
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT


class MeasuredTrainer(ParallelTrainer):
    """The parallel trainer, asked what it holds."""

    def held_bytes(self) -> dict:
        extra = [self._master_flat, self._master_grads_flat] if self.master is not None else []
        decay = sum(d.nbytes for d in getattr(self.optimizer, "decay", []) or []) if self.layout.zero else 0
        return {"pp_rank": self.mesh.pp_rank,
                "weights": self.gradients.flat_params.nbytes + (extra[0].nbytes if extra else 0),
                "gradients": self.gradients.flat_grads.nbytes + (extra[1].nbytes if extra else 0),
                "optimizer": self.optimizer_state_bytes() + decay,
                "stage_peaks": {s: stage.memory.peak_bytes for s, stage in self.stages.items()}}


CASES = [  # (dp, tp, pp, schedule, virtual stages, microbatches, zero, sequence parallel, recompute, dropout)
    (1, 1, 1, "1f1b", 1, 2, 0, False, False, 0.0),
    (2, 1, 1, "1f1b", 1, 2, 1, False, False, 0.0),
    (1, 2, 1, "1f1b", 1, 2, 0, False, False, 0.1),
    (1, 2, 1, "1f1b", 1, 2, 0, True, True, 0.0),
    (1, 1, 2, "1f1b", 1, 4, 0, False, False, 0.1),
    (1, 1, 2, "gpipe", 1, 4, 0, False, True, 0.0),
    (1, 1, 2, "interleaved", 2, 4, 0, False, False, 0.0),
    (1, 1, 2, "zb-h1", 1, 4, 0, False, False, 0.0),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,tp,pp,schedule,v,m,zero,sp,recompute,dropout", CASES)
def test_the_inventory_equals_what_ranks_hold(local_cluster, tmp_path, dp, tp, pp, schedule, v, m, zero, sp,
                                             recompute, dropout):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), n_layer=4, n_head=4, n_embd=64, block_size=64, batch_size=8,
                         microbatches=m, steps=2, eval_iters=1, dtype="float32", dropout=dropout,
                         recompute=recompute)
    reference = Trainer.create(config, str(tmp_path / "run"))
    layout = Layout(dp=dp, tp=tp, pp=pp, schedule=schedule, virtual_stages=v, zero=zero, sequence_parallel=sp)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        MeasuredTrainer, dataclasses.asdict(config), dataclasses.asdict(layout), str(tmp_path / "run" / "tokens.bin"),
        reference.tokenizer.vocab_size)
    trainers.train_step(0).result()
    measured = trainers.held_bytes().result()

    inventory = GPT2Inventory(config.gpt_config(reference.tokenizer.vocab_size))
    predicted = layout_memory(inventory, Candidate(dp, tp, pp, schedule, v, m, zero, sp, recompute), config.batch_size)
    for rank in measured:
        memory = predicted[rank["pp_rank"]]
        for part in ("weights", "gradients", "optimizer"):
            assert getattr(memory, part) == pytest.approx(rank[part], rel=0.01), part
        for stage, peak in rank["stage_peaks"].items():
            # the token ids' window (a few KB) is the only difference ActivationMemory sees
            assert memory.stage_peaks[stage] == pytest.approx(peak, rel=0.01), f"stage {stage}"

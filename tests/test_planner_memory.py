"""The planner's memory inventory equals the bytes ranks of real runs hold (weights, gradients,
optimizer state, and each stage's peak of cached activations as `ActivationMemory` measures it), so
a change to what the model keeps must change the planner too."""
import dataclasses

import pytest

from ringpipe.model.planning.family import inventory_for
from ringpipe.model.planning.memory import Candidate, layout_memory
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.run_setup import RunSetup
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


def prepared(config: TrainConfig, run_dir) -> RunSetup:
    """The run's tokenizer and RUN/tokens.bin, as the multi-worker driver makes them: no model in
    this process (a Trainer here drew the whole model first, 1.2 s of CPU at 1024 wide)."""
    setup = RunSetup.create(config, str(run_dir))
    setup.write_token_file()
    return setup


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


def assert_the_inventory_equals_what_ranks_hold(local_cluster, tmp_path, candidate, dropout, family="gpt2",
                                               **options):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), family=family, n_layer=4, n_head=4, n_embd=64, block_size=64,
                         batch_size=8, microbatches=candidate.microbatches, steps=2, eval_iters=1, dtype="float32",
                         dropout=dropout, **options)
    setup = prepared(config, tmp_path / "run")
    c = candidate
    layout = Layout(dp=c.dp, tp=c.tp, pp=c.pp, schedule=c.schedule, virtual_stages=c.virtual_stages, zero=c.zero,
                    sequence_parallel=c.sequence_parallel)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        MeasuredTrainer, dataclasses.asdict(config), dataclasses.asdict(layout), str(tmp_path / "run" / "tokens.bin"),
        setup.vocab_size, special_ids=setup.special_ids)
    trainers.train_step(0).result()
    measured = trainers.held_bytes().result()

    inventory = inventory_for(family, config.model_config(setup.vocab_size))
    predicted = layout_memory(inventory, candidate, config.batch_size)
    for rank in measured:
        memory = predicted[rank["pp_rank"]]
        for part in ("weights", "gradients", "optimizer"):
            assert getattr(memory, part) == pytest.approx(rank[part], rel=0.01), part
        for stage, peak in rank["stage_peaks"].items():
            # the token ids' window (a few KB) is the only difference ActivationMemory sees
            assert memory.stage_peaks[stage] == pytest.approx(peak, rel=0.01), f"stage {stage}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp,tp,pp,schedule,v,m,zero,sp,recompute,dropout", CASES)
def test_the_inventory_equals_what_ranks_hold(local_cluster, tmp_path, dp, tp, pp, schedule, v, m, zero, sp,
                                             recompute, dropout):
    assert_the_inventory_equals_what_ranks_hold(local_cluster, tmp_path,
                                                Candidate(dp, tp, pp, schedule, v, m, zero, sp, recompute), dropout,
                                                recompute=recompute)


BERT_CASES = [  # (Candidate, dropout, next_sentence)
    (Candidate(dp=2, zero=1, microbatches=2), 0.0, False),
    (Candidate(tp=2, sequence_parallel=True, microbatches=2), 0.1, False),
    (Candidate(tp=2, microbatches=2), 0.0, True),
    (Candidate(pp=2, microbatches=4), 0.1, False),
    (Candidate(pp=2, schedule="interleaved", virtual_stages=2, microbatches=4), 0.0, True),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("candidate,dropout,next_sentence", BERT_CASES,
                         ids=[f"{c.label()}-dropout{d}-nsp{n}" for c, d, n in BERT_CASES])
def test_the_bert_inventory_equals_what_ranks_hold(local_cluster, tmp_path, candidate, dropout, next_sentence):
    assert_the_inventory_equals_what_ranks_hold(local_cluster, tmp_path, candidate, dropout, family="bert",
                                                tokenizer="byte", next_sentence=next_sentence)

T5_CASES = [  # (Candidate, dropout, feed-forward)
    (Candidate(dp=2, zero=1, microbatches=2), 0.1, "relu"),
    (Candidate(tp=2, microbatches=2), 0.0, "gated-gelu"),
    (Candidate(pp=2, microbatches=4), 0.1, "gated-gelu"),
    (Candidate(pp=2, schedule="zb-h1", microbatches=4), 0.0, "relu"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("candidate,dropout,feed_forward", T5_CASES,
                         ids=[f"{c.label()}-dropout{d}-{f}" for c, d, f in T5_CASES])
def test_the_t5_inventory_equals_what_ranks_hold(local_cluster, tmp_path, candidate, dropout, feed_forward):
    assert_the_inventory_equals_what_ranks_hold(local_cluster, tmp_path, candidate, dropout, family="t5",
                                                tokenizer="byte", feed_forward_proj=feed_forward)


# Resident bytes are measured with 4 KiB pages only. NumPy asks the kernel for transparent huge pages
# on arrays of 4 MiB and more (madvise); whether a range gets a 2 MiB page depends on free huge pages
# at the fault (other processes' fragmentation: load) and on khugepaged's background collapses (every
# 10 s, even of mostly untouched ranges), so the same run's VmHWM came out 0..6.4 MB higher from run
# to run, never lower: a bound set on inflated runs then failed on plain ones (16.0 MB of growth
# against 16.2 required). With 4 KiB pages the figure is the bytes the rank touched, equal in every
# run to 0.1 MB, which is what the planner counts.
BYTES_NOT_HUGE_PAGES = {"env": {"NUMPY_MADVISE_HUGEPAGE": "0"}}


def _resident(comm, field="VmRSS") -> int:
    """This worker's resident bytes once the trainer's modules are imported (run first: the baseline)."""
    import ringpipe.model.training.parallel_trainer  # noqa: F401 (the idle worker has them)
    from ringpipe.runtime.process_memory import _status_bytes

    return _status_bytes(field)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family,dp,pp,zero,options", [
    ("gpt2", 2, 1, 1, {}),  # draws its own stages (float32): four copies of its share while building
    ("bert", 1, 2, 0, {"tokenizer": "byte"}),  # draws the whole model (float64) and keeps it: three
])
def test_a_cpu_rank_peaks_where_the_planner_says(tmp_path, family, dp, pp, zero, options):
    """Resident bytes (VmHWM over the idle worker's VmRSS) of fresh workers, for ranks holding ≥ 200 MB of
    state as the issue asks (a few MB of interpreter allocations are not modelled), after building the
    trainer and two steps (model/planning/memory.py's host_peak and RankMemory.peak say what they hold)."""
    from ringpipe.runtime import Cluster

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), family=family, n_layer=2, n_head=8, n_embd=1024, block_size=32,
                         batch_size=4, microbatches=2, steps=2, eval_iters=1, dtype="float32", **options)
    setup = prepared(config, tmp_path / "run")
    layout = Layout(dp=dp, pp=pp, zero=zero)
    with Cluster(layout.world_size, threads_per_worker=1, **BYTES_NOT_HUGE_PAGES) as cluster:  # fresh heaps
        idle = cluster.run(_resident)
        trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                 setup.token_file, setup.vocab_size, special_ids=setup.special_ids)
        for step in range(2):
            trainers.train_step(step).result()
        coordinates = trainers.coordinates().result()
        peaks = cluster.run(_resident, "VmHWM")
    inventory = inventory_for(family, config.model_config(setup.vocab_size))
    predicted = layout_memory(inventory, Candidate(dp, 1, pp, microbatches=2, zero=zero), config.batch_size)
    for coords, before, peak in zip(coordinates, idle, peaks):
        assert predicted[coords["pp"]].peak == pytest.approx(peak - before, rel=0.1), coords


@pytest.mark.timeout(120)
def test_training_peaks_above_the_build_by_the_weight_gradients_a_stage_keeps_through_its_backward(tmp_path):
    """A deep narrow model, whose training peak (weights, gradients, AdamW's moments, activations,
    and the fresh weight gradients of every block of the stage until its backward-weight ends) passes
    its build peak: the rank's VmHWM over the idle worker's VmRSS is where the planner says, not the
    build's peak (which it was, less by one copy of the blocks' parameters, before they were counted)."""
    from ringpipe.runtime import Cluster

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), n_layer=6, n_head=8, n_embd=512, block_size=32, batch_size=4,
                         steps=2, eval_iters=1, dtype="float32")
    setup = prepared(config, tmp_path / "run")
    with Cluster(1, threads_per_worker=1, **BYTES_NOT_HUGE_PAGES) as cluster:  # a fresh heap
        idle = cluster.run(_resident)[0]
        trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(Layout()),
                                 str(tmp_path / "run" / "tokens.bin"), setup.vocab_size)
        built = cluster.run(_resident, "VmHWM")[0]
        for step in range(2):
            trainers.train_step(step).result()
        peak = cluster.run(_resident, "VmHWM")[0]
    inventory = inventory_for("gpt2", config.model_config(setup.vocab_size))
    predicted = layout_memory(inventory, Candidate(), config.batch_size)[0]
    assert predicted.host_peak == pytest.approx(built - idle, rel=0.1)
    assert predicted.total > predicted.host_peak  # training, not the build, sets this rank's peak
    # Measured (4 KiB pages): +16.0 MB over the build in every run, predicted +32 MB; the predicted peak
    # is 3.8 % over the measured one (the build's peak alone would be 4.4 % short).
    assert -0.02 <= predicted.peak / (peak - idle) - 1 <= 0.05
    assert peak - built > (predicted.peak - predicted.host_peak) / 4  # the rank's own peak is training's

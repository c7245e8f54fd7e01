"""What the planner's step time charges besides the pieces' compute, held to what real ranks do (no
timed assertions): the other work on the cores counted now, each micro-batch's gradient
accumulation, and rates measured where memory, not the cache, sets them."""
import dataclasses

import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.machine import load_machine
from ringpipe.model.planning.memory import Candidate, stage_elements, stage_ranges
from ringpipe.model.planning.step_time import architecture_key, predict_step
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT


def test_background_load_counts_the_tasks_running_now_less_the_reader(tmp_path):
    from ringpipe.tools.plan_calibration import background_load

    loadavg = tmp_path / "loadavg"
    # a load average of 9.5 left by work that has ended; 3 tasks running now, one of them the reader
    loadavg.write_text("9.50 5.00 2.00 3/400 1234\n")
    assert background_load(samples=3, interval=0.0, path=str(loadavg)) == 2.0
    assert background_load(samples=2, interval=0.0) >= 0.0  # this host's /proc/loadavg reads


def test_two_ranks_on_two_idle_cores_compute_as_fast_as_the_calibrated_lone_process():
    machine = load_machine("h100-8x-node")
    # calibrated with nothing else running, though the load average still counted earlier work
    machine.kind, machine.cores, machine.calibration = "cpu", 2, {"background_load": 0.0, "load_average": 1.5}
    assert machine.oversubscription(2) == 1.0
    assert machine.oversubscription(4) == 2.0
    machine.calibration = {"load_average": 1.5}  # an older file: its load average less the calibrating process
    assert machine.oversubscription(2) == pytest.approx(2.5 / 2)


def _accumulation_only_machine(inventory, rows, seconds_per_element):
    """A calibrated machine whose pieces, optimizer and zeroing cost nothing: only accumulation."""
    machine = load_machine("h100-8x-node")
    nothing = {"forward": 0.0, "backward_input": 0.0, "backward_weight": 0.0}
    machine.calibration = {"compute": {
        "model": architecture_key(inventory), "optimizer_seconds_per_element": 1e-30,
        "gradient_pass_seconds": {"zero": 0.0, "accumulate": seconds_per_element},
        "pieces": {f"{piece}|{b}": nothing for piece in ("block", "head", "embedding") for b in rows}}}
    return machine


@pytest.mark.parametrize("microbatches", [1, 4])
def test_each_micro_batch_adds_one_accumulation_pass_over_the_ranks_gradients(microbatches):
    inventory = GPT2Inventory(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    machine = _accumulation_only_machine(inventory, [4 // microbatches], 1e-9)
    candidate = Candidate(microbatches=microbatches)
    blocks, ends = stage_elements(inventory, 1, stage_ranges(inventory, candidate)[0], True, True)
    timing = predict_step(inventory, candidate, 4, machine)
    assert timing.seconds == pytest.approx(microbatches * (blocks + ends) * 1e-9, rel=1e-6)


class CountingTrainer(ParallelTrainer):
    """The parallel trainer, counting the gradient elements its stages add into their gradients."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulated = 0
        for stage in self.stages.values():
            stage._accumulate = self._counting(stage._accumulate)

    def _counting(self, accumulate):
        def counted(grads):
            self.accumulated += sum(g.size for g in grads.values())
            return accumulate(grads)
        return counted

    def accumulated_elements(self) -> dict:
        return {"pp_rank": self.mesh.pp_rank, "elements": self.accumulated}


@pytest.mark.timeout(120)
def test_a_pipeline_rank_accumulates_its_parameters_once_per_micro_batch_as_the_planner_charges(
        local_cluster, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(data=str(corpus), n_layer=3, n_head=2, n_embd=16, block_size=16, batch_size=4,
                         microbatches=4, steps=1, eval_iters=1, dtype="float32")
    reference = Trainer.create(config, str(tmp_path / "run"))
    layout = Layout(pp=2)
    trainers = local_cluster(2).spawn(CountingTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(tmp_path / "run" / "tokens.bin"), reference.tokenizer.vocab_size)
    trainers.train_step(0).result()
    measured = trainers.accumulated_elements().result()

    inventory = GPT2Inventory(config.gpt_config(reference.tokenizer.vocab_size))
    candidate = Candidate(pp=2, microbatches=4)
    ranges = stage_ranges(inventory, candidate)
    for rank in measured:
        s = rank["pp_rank"]
        blocks, ends = stage_elements(inventory, 1, ranges[s], s == 0, s == len(ranges) - 1)
        assert rank["elements"] == 4 * (blocks + ends), rank


def test_calibration_times_per_byte_rates_on_arrays_beyond_the_last_level_cache():
    from ringpipe.tools.plan_calibration import SIZES, beyond_cache_bytes, last_level_cache_bytes

    assert beyond_cache_bytes() >= min(4 * last_level_cache_bytes(), 256 << 20)
    assert SIZES[1] == beyond_cache_bytes()  # the bandwidth end of the collectives' fit

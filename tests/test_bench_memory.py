"""`ringpipe bench memory`: a model bigger than one worker's memory limit trains, checkpoints, exports
and resumes; a worker the limit's OOM killer ends is one line."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.runtime.memory_cgroup import unavailable

TINY = ["bench", "memory", "--n-layer", "2", "--n-embd", "256", "--n-head", "4", "--block-size", "16", "--steps", "1"]
SMALL = ["bench", "memory", "--n-layer", "4", "--n-embd", "256", "--n-head", "4", "--vocab-size", "4096",
         "--block-size", "16", "--steps", "1"]  # one process: 67 MB; a rank at tp 2 × pp 2: about a third
needs_cgroups = pytest.mark.skipif(bool(unavailable()), reason=str(unavailable()))


def test_a_rank_draws_its_own_parameters_with_the_values_of_the_whole_model():
    config = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=8, vocab_size=300)
    whole = init_params(config, seed=5)
    part = init_params(config, seed=5, names={"h.1.attn.c_attn.weight", "ln_f.weight"}, dtype=np.float32)
    assert sorted(part) == ["h.1.attn.c_attn.weight", "ln_f.weight"]
    for name, value in part.items():
        assert value.dtype == np.float32 and np.array_equal(value, whole[name].astype(np.float32))


def test_a_limit_that_one_process_would_fit_in_is_refused():
    result = CliRunner().invoke(main, [*TINY, "--worker-memory", "1.0"])
    assert result.exit_code != 0
    assert "is not below what one process needs (0.22 GiB" in result.output


@needs_cgroups
@pytest.mark.timeout(180)
def test_the_model_trains_with_every_worker_below_the_single_process_need(tmp_path):
    path = tmp_path / "memory.json"
    result = CliRunner().invoke(main, [*SMALL, "--worker-memory", "0.05", "--json", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    targets = report["targets"]
    assert targets["ranks_within_10_percent_of_share"] and targets["every_rank_below_single_process_need"], \
        result.output
    assert targets["checkpoint_export_and_resume_completed_under_the_limits"], result.output
    assert len(report["run"]["losses"]) == 2  # one step, then one more after resuming from the checkpoint
    # The driver's 5 % is of a large model's weights (see the README's run); here they are 16 MiB, and
    # its growth over its idle baseline (messages, the export's chunk, the resume's tokenizing) is
    # about 10 MiB whatever the model: at most one 32 MiB export chunk.
    assert report["driver"]["growth"] < 32 * (1 << 20), result.output
    assert report["single_process"]["total"] > report["worker_limit_bytes"]
    for rank in report["ranks"]:
        assert rank["cgroup_peak"] <= report["worker_limit_bytes"]
        assert rank["weights"] + rank["gradients"] + rank["optimizer"] < report["worker_limit_bytes"]
    assert "met  ranks within 10 percent of share" in result.stdout


@needs_cgroups
@pytest.mark.timeout(180)
def test_a_worker_over_its_limit_is_reported_as_killed_by_the_oom_killer():
    result = CliRunner().invoke(main, [*TINY, "--tp", "1", "--pp", "1", "--worker-memory", "0.05"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: worker rank ") and "was killed by the out-of-memory killer of its cgroup: " \
        "its limit of 0.05 GiB was reached" in last, result.output

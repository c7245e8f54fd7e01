"""`ringpipe bench memory`: a model bigger than one worker's memory limit trains, checkpoints, exports
and resumes; a worker the limit's OOM killer ends is one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.runtime.memory_cgroup import MemoryCgroup, UsageSampler, unavailable

TINY = ["bench", "memory", "--n-layer", "2", "--n-embd", "256", "--n-head", "4", "--block-size", "16", "--steps", "1"]
# One process: 66 MB; a rank at tp 2 × pp 2: about a quarter. A small vocabulary: the last stage holds
# the tied wte without its moments, so a large one would leave it well off 1/(tp·pp) of the model.
SMALL = ["bench", "memory", "--n-layer", "4", "--n-embd", "288", "--n-head", "4", "--vocab-size", "512",
         "--block-size", "16", "--steps", "1"]
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
def test_the_model_trains_with_every_worker_below_the_single_process_need_and_a_missed_target_fails(tmp_path):
    path = tmp_path / "memory.json"
    # A process of its own, as a user runs it: the driver's growth over its idle baseline is measured
    # by its VmHWM, which a test process's earlier (freed, reused) heap would hide.
    result = subprocess.run([sys.executable, "-m", "ringpipe.cluster", *SMALL, "--worker-memory", "0.05", "--json",
                             str(path)], capture_output=True, text=True, timeout=170)
    output = result.stdout + result.stderr
    # The driver's 5 % is of a large model's weights (see the README's run); here they are 16 MiB, and
    # its growth over its idle baseline (messages, the export's chunk, the resume's tokenizing) is
    # about 10 MiB whatever the model: the one target missed, and so a non-zero exit naming it.
    assert result.returncode == 1, output
    assert result.stderr.strip().splitlines()[-1] == \
        "Error: bench memory: 1 target(s) MISSED: driver growth below 5 percent of weights", output
    report = json.loads(path.read_text())
    assert [name for name, met in report["targets"].items() if not met] == \
        ["driver_growth_below_5_percent_of_weights"], output
    assert len(report["run"]["losses"]) == 2  # one step, then one more after resuming from the checkpoint
    assert report["driver"]["growth"] < 32 * (1 << 20), output  # at most one 32 MiB export chunk
    assert report["single_process"]["total"] > report["worker_limit_bytes"]
    for rank in report["ranks"] + report["resumed_ranks"]:
        # the resident peak (no page cache) is what the target reads; the charge counts both
        assert 0 < rank["cgroup_resident_peak"] <= rank["cgroup_peak"] <= report["worker_limit_bytes"], \
            (rank, output)
        assert rank["cgroup_cache_peak"] >= 0, (rank, output)
    for rank in report["ranks"]:  # (what the ranks hold, as they report it, is resident)
        assert rank["weights"] + rank["gradients"] + rank["optimizer"] < rank["cgroup_resident_peak"], \
            (rank, output)
    assert "met  ranks within 10 percent of their share of the model" in result.stdout
    assert "met  worker resident peaks within the limit" in result.stdout


@needs_cgroups
@pytest.mark.timeout(180)
def test_a_worker_over_its_limit_is_reported_as_killed_by_the_oom_killer():
    result = CliRunner().invoke(main, [*TINY, "--tp", "1", "--pp", "1", "--worker-memory", "0.05"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: worker rank ") and "was killed by the out-of-memory killer of its cgroup: " \
        "its limit of 0.05 GiB was reached" in last, result.output


@needs_cgroups
@pytest.mark.timeout(60)
def test_a_cgroup_tells_resident_memory_from_the_page_cache_of_files_written(tmp_path):
    """64 MiB of anonymous memory is resident; 32 MiB written to a file is page cache, not resident."""
    script = ("import sys, numpy as np; sys.stdin.readline(); a = np.ones(64 << 17); "
              f"open({str(tmp_path / 'file')!r}, 'wb').write(bytes(32 << 20)); print('ready', flush=True); "
              "sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    group = MemoryCgroup.create(f"ringpipe-test-{os.getpid()}", 1 << 30)
    try:
        group.add(child.pid)
        sampler = UsageSampler({0: group}, interval=0.005).start()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "ready\n"
        usage = group.usage()
        peaks = sampler.stop()
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(10)
    finally:
        child.kill()
        child.wait()
        group.remove()
    MiB = 1 << 20
    assert usage["resident"] == usage["anon"] + usage["shmem"] + usage["kernel"]
    assert 64 * MiB <= usage["anon"] < 128 * MiB, usage  # the array and the interpreter's own
    assert usage["file"] >= 30 * MiB, usage  # the file's pages, not counted as resident
    assert peaks[0]["resident"] >= 64 * MiB and peaks[0]["file"] >= 30 * MiB and peaks[0]["samples"] >= 2

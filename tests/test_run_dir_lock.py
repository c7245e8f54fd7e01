"""One training run per --out: the driver flocks RUN/.lock for its life; the kernel frees it when
the driver dies, however it dies. And what a start deletes of an earlier run, it names."""
import os
import signal
import subprocess
import sys

import pytest

from ringpipe.model.training.run_dir import lock_run_dir
from tests.conftest import one_error_line, run_cli
from tests.test_train import TINY_FLAGS

HOLDER = ("import sys, time; from ringpipe.model.training.run_dir import lock_run_dir; "
          "lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)")


@pytest.mark.timeout(60)
def test_a_second_run_into_a_held_out_is_refused_naming_the_holder_and_sigkill_leaves_no_stale_lock(
        corpus, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in ([], ["--overwrite"]):
            line = one_error_line(run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 1, *resume, "--out", out))
            assert line.startswith("Error: Invalid value for --out") and "in use by another training run" in line
            assert f"pid {holder.pid} on " in line, line
        assert sorted(os.listdir(out)) == [".lock"]  # nothing of the refused run was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    os.close(lock_run_dir(str(out)))  # the kernel released the killed holder's lock
    result = run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 1, "--out", out)
    assert result.exit_code == 0, result.output
    os.close(lock_run_dir(str(out)))  # ...and the finished run its own


def test_a_start_names_the_unfinished_checkpoint_it_deletes(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 1, "--out", out).exit_code == 0
    unfinished = out / "checkpoints" / "step-00000002"
    unfinished.mkdir(parents=True)
    (unfinished / "rank-00000.safetensors").write_bytes(b"cut short")
    result = run_cli("train", "--resume", "--data", corpus, *TINY_FLAGS, "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"removed the unfinished checkpoint {unfinished} " in result.output, result.output
    assert not unfinished.exists()

"""Ctrl-C in `ringpipe train`: exit status 130 at any moment, a line of its own, an honest resume hint."""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A background job of a non-interactive shell (CI, nohup ... &) starts with SIGINT ignored, and
# Python keeps it so; Ctrl-C reaches a command run from a terminal. "ready" once it would.
DRIVER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "print('ready', flush=True); sys.argv[0] = 'ringpipe'; "
          "from ringpipe.cluster.__main__ import run; run()")
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--warmup", "1", "--eval-every", "0", "--eval-iters", "1", "--steps", "100000"]


def start(*args):
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *[str(a) for a in args]], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def wait_for(condition, proc, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def interrupt(proc):
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "Aborted!" not in stderr, stderr
    return proc.returncode, stderr.strip().splitlines()


def has_a_step(out):
    path = out / "metrics.jsonl"
    return path.exists() and path.read_text().count("\n") >= 1


@pytest.mark.timeout(120)
def test_ctrl_c_before_the_first_checkpoint_exits_130_saying_no_checkpoint_was_written(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start("train", "--data", corpus, *TINY, "--checkpoint-every", 0, "--out", out)
    wait_for(lambda: has_a_step(out), proc)
    code, lines = interrupt(proc)
    assert code == 130
    assert lines[-1].startswith("interrupted after step") and "no checkpoint was written" in lines[-1], lines
    assert "--resume" not in lines[-1]


@pytest.mark.timeout(120)
def test_ctrl_c_after_a_checkpoint_names_its_step_and_how_to_resume(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start("train", "--data", corpus, *TINY, "--checkpoint-every", 2, "--out", out)
    wait_for(lambda: (out / "checkpoint").is_dir(), proc)
    code, lines = interrupt(proc)
    assert code == 130
    assert "the last checkpoint is at step" in lines[-1] and f"--resume --out {out}" in lines[-1], lines


@pytest.mark.timeout(120)
def test_ctrl_c_while_starting_up_exits_130(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start("train", "--data", corpus, *TINY, "--out", out)
    first = proc.stderr.readline()
    assert first.startswith(("compiling", "tokenizing")) and first.endswith(" ...\n"), first
    code, lines = interrupt(proc)  # while tokenizing, compiling or building the model
    assert code == 130 and lines[-1].startswith("interrupted"), lines
    assert "no checkpoint was written" in lines[-1], lines


@pytest.mark.timeout(120)
def test_ctrl_c_of_a_multi_worker_run_exits_130_and_stops_every_worker(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start("train", "--data", corpus, *TINY, "--nproc", 2, "--dp", 2, "--out", out)
    wait_for(lambda: has_a_step(out), proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    code, lines = interrupt(proc)
    assert code == 130
    assert lines[-1].startswith("interrupted after step") and "no checkpoint was written" in lines[-1], lines
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


# ---- what a run says during the stretches that print no step -------------------------------------
@pytest.mark.timeout(120)
def test_a_run_says_what_it_is_doing_before_its_first_step(train_run_from_an_empty_kernel_cache):
    result, _ = train_run_from_an_empty_kernel_cache  # 2 workers, no C kernels built yet
    lines = result.stderr.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    status = [line for line in lines[:first_step] if line.endswith(" ...")]
    assert [line.split()[0] for line in status] == ["compiling", "tokenizing", "starting"], lines
    assert "corpus.txt" in status[1] and "2 workers" in status[2]


@pytest.mark.timeout(120)
def test_sigterm_after_a_checkpoint_exits_143_naming_its_step_and_how_to_resume(corpus, tmp_path):
    out = tmp_path / "run"
    proc = start("train", "--data", corpus, *TINY, "--checkpoint-every", 2, "--out", out)
    wait_for(lambda: (out / "checkpoint").is_dir(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert "the last checkpoint is at step" in last and f"--resume --out {out}" in last, last

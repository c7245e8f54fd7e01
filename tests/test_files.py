"""Files ringpipe writes: a full disk or an unwritable path is one error line naming the path, with no
temporary left and the previous content intact; a killed writer's temporaries go on the next start;
checkpoints carry checksums and a record of their shapes, so damage and contradicting configs are refused."""
import json
import os
import signal
import struct
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from ringpipe.cluster.cli import main
from ringpipe.cluster.options import OutputDirectory, OutputFile
from ringpipe.model.gpt2.model import GPT
from ringpipe.runtime.files import (AppendLog, CorruptFileError, FileWriteError, load_tensors, remove_dead_temporaries,
                           save_tensors, write_bytes)
from tests.conftest import one_error_line, run_cli
from tests.test_trace_tools import RANK0, RANK1, write_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-iters", "1", "--eval-every", "0", "--warmup", "1"]


def temporaries(directory) -> list[str]:
    return [os.path.join(root, name) for root, dirs, files in os.walk(directory) for name in dirs + files
            if ".tmp-" in name]


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs (needs root); unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory, leave_bytes: int) -> None:
    """Occupy the filesystem of `directory` until about `leave_bytes` are free."""
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    with open(os.path.join(directory, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


# ---- full disk ---------------------------------------------------------------------------------------
def test_a_checkpoint_that_does_not_fit_fails_in_one_line_and_keeps_the_previous_one(small_disk, corpus):
    out = small_disk / "run"
    # ~0.9 MB of weights + 1.8 MB of AdamW moments: the first checkpoint fits, a second beside it does not.
    result = run_cli("train", "--data", corpus, *TINY, "--n-layer", "2", "--n-embd", "96", "--steps", 4,
                     "--checkpoint-every", 2, "--out", out)
    line = one_error_line(result)
    assert f"cannot write {out}/checkpoint/" in line and "No space left on device" in line, line
    assert "checkpoint of step 2" in line and "--resume" in line
    assert temporaries(out) == []
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 2
    GPT.from_pretrained(out / "checkpoint")  # complete, and its checksums verify


def test_a_token_cache_that_does_not_fit_fails_in_one_line(small_disk, corpus):
    fill(small_disk, 8 << 10)
    out = small_disk / "run"
    line = one_error_line(run_cli("train", "--data", corpus, *TINY, "--steps", 1, "--out", out))
    assert f"cannot write {out}/tokens.bin: No space left on device" in line
    assert temporaries(small_disk) == []


@pytest.mark.parametrize("command, name", [("view", "x.html"), ("export", "t.json")])
def test_a_trace_output_that_does_not_fit_fails_in_one_line_and_keeps_the_old_file(small_disk, tmp_path,
                                                                                     command, name):
    write_trace(tmp_path / "trace", [RANK0, RANK1])
    target = small_disk / name
    target.write_text("previous")
    fill(small_disk, 0)
    line = one_error_line(run_cli("trace", command, tmp_path / "trace", "-o", target))
    assert f"cannot write {target}: No space left on device" in line
    assert target.read_text() == "previous" and temporaries(small_disk) == []


def test_bench_json_that_does_not_fit_fails_in_one_line(small_disk):
    fill(small_disk, 0)
    target = small_disk / "bench.json"
    result = run_cli("bench", "collectives", "--world-size", 1, "--ops", "all_reduce", "--sizes", "1K",
                     "--rounds", 1, "--iters", 1, "--json", target)  # the least bench that writes its JSON
    assert f"cannot write {target}: No space left on device" in one_error_line(result)
    assert not target.exists() and temporaries(small_disk) == []


def test_an_appended_log_that_does_not_fit_raises_file_write_error(small_disk):
    fill(small_disk, 0)
    log = AppendLog(str(small_disk / "metrics.jsonl"))
    with pytest.raises(FileWriteError, match="metrics.jsonl: No space left on device"):
        log.write("x" * (64 << 10))
        log.flush()
    log.close()


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(small_disk):
    target = small_disk / "data.bin"
    write_bytes(target, b"old")
    with pytest.raises(FileWriteError, match=f"cannot write {target}: No space left on device"):
        write_bytes(target, b"\1" * (4 << 20))
    assert target.read_bytes() == b"old" and sorted(os.listdir(small_disk)) == ["data.bin"]


# ---- output paths checked before the work starts ------------------------------------------------------
@pytest.mark.parametrize("args, path", [
    (["trace", "view", "RUN", "-o", "/nonexistent/x.html"], "/nonexistent/x.html"),
    (["trace", "export", "RUN", "-o", "/nonexistent/t.json"], "/nonexistent/t.json"),
    (["bench", "collectives", "--world-size", "2", "--json", "/nonexistent/x.json"], "/nonexistent/x.json"),
    (["bench", "model", "--json", "/nonexistent/x.json"], "/nonexistent/x.json"),
    (["train", "--out", "/proc/forbidden"], "/proc/forbidden"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path, args, path):
    write_trace(tmp_path / "trace", [RANK0, RANK1])
    args = [str(tmp_path / "trace") if a == "RUN" else a for a in args]
    result = run_cli(*args)
    line = one_error_line(result)
    assert f"cannot write {path}" in line, line
    assert result.output.startswith("Error: ")  # nothing ran before it (no table, no progress)


def test_every_output_flag_of_every_command_is_checked_up_front():
    def commands(group):
        for command in group.commands.values():
            yield from commands(command) if isinstance(command, click.Group) else [command]

    unchecked = [(command.name, param.name) for command in commands(main) for param in command.params
                 if param.name in ("out", "output", "json_path")
                 and not isinstance(param.type, (OutputFile, OutputDirectory))]
    assert unchecked == []


# ---- temporaries of killed writers --------------------------------------------------------------------
KILLED_WRITER = """
import os, signal, sys
from ringpipe.runtime.files import staged_directory
with staged_directory(sys.argv[1]) as stage:
    with open(os.path.join(stage, "model.safetensors"), "wb") as f:
        f.write(b"half a checkpoint")
    print(stage, flush=True)
    {end}
"""


def start_writer(target, end):
    return subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(end=end), str(target)], cwd=ROOT,
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)


@pytest.mark.timeout(60)
def test_a_checkpoint_temporary_of_a_killed_writer_is_removed_when_the_run_resumes(tmp_path, corpus):
    out = tmp_path / "run"
    assert run_cli("train", "--data", corpus, *TINY, "--steps", 2, "--out", out).exit_code == 0
    writer = start_writer(out / "checkpoint", "os.kill(os.getpid(), signal.SIGKILL)")
    stage = writer.stdout.readline().strip()
    assert writer.wait() == -signal.SIGKILL and os.path.isdir(stage)
    result = run_cli("train", "--resume", "--out", out, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert temporaries(out) == []


@pytest.mark.timeout(60)
def test_a_live_writers_temporary_is_kept_until_it_ends(tmp_path):
    writer = start_writer(tmp_path / "checkpoint", "sys.stdin.read()")
    try:
        stage = writer.stdout.readline().strip()
        assert remove_dead_temporaries(str(tmp_path)) == [] and os.path.isdir(stage)
    finally:
        writer.kill()
        writer.wait()
    assert remove_dead_temporaries(str(tmp_path)) == [stage] and not os.path.exists(stage)


# ---- checksums and the shape record -------------------------------------------------------------------
@pytest.fixture
def run(tmp_path, corpus):
    out = tmp_path / "run"
    assert run_cli("train", "--data", corpus, *TINY, "--steps", 2, "--out", out).exit_code == 0
    return out


def flip_byte_inside(path, tensor: str) -> None:
    """Flip one bit in the middle of `tensor`'s data, leaving the header intact."""
    data = bytearray(path.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + header_length])[tensor]["data_offsets"]
    data[8 + header_length + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, tensor", [("model.safetensors", "transformer.h.0.attn.c_attn.weight"),
                                          ("optimizer.safetensors", "m.h.0.mlp.c_fc.weight")])
def test_a_flipped_byte_in_a_checkpoint_is_refused_naming_the_file_and_tensor(run, file, tensor):
    flip_byte_inside(run / "checkpoint" / file, tensor)
    line = one_error_line(run_cli("train", "--resume", "--out", run, "--steps", 3))
    assert f"{run}/checkpoint/{file}" in line and tensor in line and "checksum" in line, line


def test_a_flipped_byte_in_a_model_is_refused_by_generate(run):
    flip_byte_inside(run / "model.safetensors", "transformer.wte.weight")
    line = one_error_line(run_cli("generate", "--checkpoint", run))
    assert "model.safetensors" in line and "transformer.wte.weight" in line


@pytest.mark.parametrize("where", ["model", "checkpoint"])
def test_a_config_that_contradicts_the_stored_record_is_refused(run, where):
    directory = run if where == "model" else run / "checkpoint"
    config = json.loads((directory / "config.json").read_text())
    config["n_head"] = 1  # shapes do not depend on n_head: only the record can tell
    config["ringpipe"]["n_head"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    args = ("generate", "--checkpoint", run) if where == "model" else ("train", "--resume", "--out", run, "--steps", 3)
    line = one_error_line(run_cli(*args))
    assert "config.json: n_head 1 contradicts" in line and "model.safetensors" in line, line


def test_a_checkpoint_without_checksums_still_loads(run):
    # As written before checksums existed (or by transformers): no metadata beyond "format".
    for name in ("model.safetensors", "checkpoint/model.safetensors", "checkpoint/optimizer.safetensors"):
        path = run / name
        save_file(load_file(path), path, metadata={"format": "pt"})
    assert run_cli("generate", "--checkpoint", run, "--max-new-tokens", 3).exit_code == 0
    assert run_cli("train", "--resume", "--out", run, "--steps", 3).exit_code == 0


def test_tensors_round_trip_through_the_reference_reader_with_their_checksums(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(7, np.int64),
               "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "empty": np.zeros((0, 4), np.float32),
               "mask": np.array([True, False]), "ids": np.arange(5, dtype=np.uint16),
               "big_endian": np.arange(4, dtype=">f4")}
    save_tensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    reference = load_file(tmp_path / "t.safetensors")  # safetensors' own reader
    loaded, metadata = load_tensors(tmp_path / "t.safetensors")
    for name, array in tensors.items():
        assert reference[name].shape == array.shape and np.array_equal(reference[name], array), name
        assert np.array_equal(loaded[name], array), name
    assert metadata["format"] == "pt" and set(json.loads(metadata["ringpipe.checksums"])) == set(tensors)
    flip_byte_inside(tmp_path / "t.safetensors", "a")
    with pytest.raises(CorruptFileError, match="tensor a does not match"):
        load_tensors(tmp_path / "t.safetensors")


def test_a_safetensors_file_does_not_depend_on_the_order_its_metadata_was_built_in(tmp_path):
    tensors = {"b": np.arange(3.0), "a": np.ones((2, 2), np.float32)}
    save_tensors(tmp_path / "one.safetensors", tensors, metadata={"format": "pt", "ringpipe.family": "gpt2"})
    save_tensors(tmp_path / "two.safetensors", tensors, metadata={"ringpipe.family": "gpt2", "format": "pt"})
    one, two = (tmp_path / "one.safetensors").read_bytes(), (tmp_path / "two.safetensors").read_bytes()
    assert one == two
    assert load_tensors(tmp_path / "one.safetensors")[1]["format"] == "pt"


def test_temporary_names_carry_the_writer(tmp_path):
    from ringpipe.runtime.files import temporary_name

    name = os.path.basename(temporary_name(str(tmp_path / "x.json")))
    assert name.startswith("x.json.tmp-") and f"-{os.getpid()}-" in name


def kill_during_a_checkpoint_write(args, out) -> bool:
    """Start `ringpipe train ARGS`; SIGKILL it while a checkpoint after the first is half written
    (the weights staged, trainer.json not yet). True if a staged checkpoint was left behind."""
    driver = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "train", *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while driver.poll() is None:
            for name in os.listdir(out) if (out / "checkpoint").is_dir() else []:
                stage = out / name
                if name.startswith("checkpoint.tmp-") and (stage / "model.safetensors").exists() \
                        and not (stage / "trainer.json").exists():
                    driver.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.002)  # a write of ~20 MB lasts far longer; a busy poll took a core from the driver
    finally:
        driver.kill()
        driver.wait()
    return any(name.startswith("checkpoint.tmp-") for name in os.listdir(out))


@pytest.mark.timeout(180)
def test_sigkill_of_the_driver_during_a_checkpoint_write_leaves_nothing_after_resume(tmp_path, corpus):
    out = tmp_path / "run"
    # Checkpoints of ~20 MB every step, so the driver spends much of its time writing them.
    args = ["--data", corpus, *TINY, "--n-layer", "2", "--n-embd", "256", "--steps", "1000",
            "--checkpoint-every", "1", "--out", str(out)]
    for attempt in range(8):  # the kill may land just after a write finished: then try again
        if kill_during_a_checkpoint_write(args + (["--resume"] if attempt else []), out):
            break
    else:
        pytest.fail("no SIGKILL landed inside a checkpoint write in 8 attempts")
    step = json.loads((out / "checkpoint" / "trainer.json").read_text())["step"]
    result = run_cli("train", "--resume", "--out", out, "--steps", step + 1)
    assert result.exit_code == 0, result.output
    assert temporaries(out) == []


@pytest.mark.timeout(60)
def test_a_workers_trace_that_does_not_fit_is_a_file_write_error_naming_the_file(small_disk):
    from ringpipe.runtime import Cluster, RemoteError

    with Cluster(2) as cluster:
        cluster.start_trace()
        fill(small_disk, 0)
        with pytest.raises(RemoteError) as info:
            cluster.stop_trace(str(small_disk))
    assert info.value.exc_type == "FileWriteError"
    assert f"cannot write {small_disk}/trace-rank" in str(info.value).splitlines()[0]
    assert "No space left on device" in str(info.value).splitlines()[0]
    assert temporaries(small_disk) == []


def test_a_file_write_error_from_a_worker_is_one_line_in_any_command():
    from ringpipe.cluster.cli import Commands
    from ringpipe.runtime import RemoteError

    @click.group(cls=Commands)
    def group():
        pass

    @group.command()
    def stop():
        raise RemoteError(1, "FileWriteError", "FileWriteError: cannot write /out/trace-rank1.json: "
                          "No space left on device", "Traceback ...\n", "stop_trace")

    line = one_error_line(CliRunner().invoke(group, ["stop"]))
    assert line.startswith("Error: rank 1 raised FileWriteError: cannot write /out/trace-rank1.json")

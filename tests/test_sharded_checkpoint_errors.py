"""A damaged sharded checkpoint: one line naming the tensor and the file, and the newest older intact
checkpoint with how to use it, a non-zero exit, before any training, and nothing overwritten, through
`ringpipe train --resume` and `ringpipe export`."""
import hashlib
import json
import os
import shutil

import pytest

from ringpipe.model.training.checkpoint_integrity import fallback_hint
from ringpipe.model.training.run_dir import find_checkpoint
from tests.conftest import one_error_line, run_cli

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
        "--eval-iters", "1", "--dtype", "float64"]
ATTENTION = "transformer.h.0.attn.c_attn.weight"


def edit_metadata(checkpoint, change):
    path = os.path.join(checkpoint, "checkpoint.json")
    with open(path) as f:
        metadata = json.load(f)
    change(metadata)
    with open(path, "w") as f:
        json.dump(metadata, f)


def remove_piece_file(checkpoint):
    os.remove(os.path.join(checkpoint, "rank-00001.safetensors"))
    return "rank-00001.safetensors", "tensor "


def uncovered_shape(checkpoint):
    edit_metadata(checkpoint, lambda m: m["tensors"][ATTENTION]["pieces"].pop())
    return "checkpoint.json", ATTENTION


def short_piece(checkpoint):
    path = os.path.join(checkpoint, "rank-00000.safetensors")
    os.truncate(path, os.path.getsize(path) - 8)
    return "rank-00000.safetensors", "is truncated"


def wrong_dtype(checkpoint):
    edit_metadata(checkpoint, lambda m: m["tensors"][ATTENTION].update(dtype="float32"))
    return "rank-0000", ATTENTION


def wrong_checksum(checkpoint):
    with open(os.path.join(checkpoint, "checkpoint.json")) as f:
        piece = json.load(f)["tensors"][ATTENTION]["pieces"][-1]  # a weight: the export reads it too
    with open(os.path.join(checkpoint, piece["file"]), "r+b") as f:
        f.seek(piece["byte_offset"])
        first = f.read(1)
        f.seek(piece["byte_offset"])
        f.write(bytes([first[0] ^ 0xFF]))
    return piece["file"], "checksum"


def other_model(checkpoint):
    edit_metadata(checkpoint, lambda m: m["model"].update(n_embd=32))
    return "checkpoint.json", "32"  # the run's n_embd is 16; the export finds shapes that do not fit 32


def emptied_piece_file(checkpoint):
    open(os.path.join(checkpoint, "rank-00001.safetensors"), "wb").close()
    return "rank-00001.safetensors", "truncated: 0 bytes"


def header_cut_off(checkpoint):
    path = os.path.join(checkpoint, "rank-00000.safetensors")
    os.truncate(path, 20)
    return "rank-00000.safetensors", "truncated: 20 bytes"


def garbled_metadata(checkpoint):
    with open(os.path.join(checkpoint, "checkpoint.json"), "w") as f:
        f.write('{"format": ')
    return "checkpoint.json", "corrupt checkpoint file"


DAMAGES = [remove_piece_file, uncovered_shape, short_piece, wrong_dtype, wrong_checksum, other_model,
           emptied_piece_file, header_cut_off, garbled_metadata]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained two steps on two tensor-parallel workers: sharded checkpoints after each."""
    directory = tmp_path_factory.mktemp("trained")
    corpus = directory / "corpus.txt"
    from tests.conftest import TEXT

    corpus.write_text(TEXT)
    out = directory / "run"
    result = run_cli("train", "--data", corpus, *TINY, "--steps", 2, "--checkpoint-every", 1, "--nproc", 2,
                     "--tp", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return corpus, out


def damaged_copy(trained, tmp_path, damage):
    corpus, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    expected = damage(find_checkpoint(str(run)))
    return corpus, run, expected


def fingerprint(directory) -> dict:
    """Every file's hash but the ranks' logs (runtime/rank_logs.py), which each attempt appends to."""
    return {os.path.relpath(os.path.join(root, name), directory):
            hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(directory) for name in names
            if os.path.relpath(root, directory) != "logs"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_resuming_from_a_damaged_checkpoint_names_the_tensor_and_the_file_and_changes_nothing(
        trained, tmp_path, damage):
    corpus, run, (file, what) = damaged_copy(trained, tmp_path, damage)
    before = fingerprint(run)
    line = one_error_line(run_cli("train", "--data", corpus, "--resume", "--steps", 3, "--nproc", 2, "--tp", 2,
                                  "--out", run))
    assert file in line and what in line, line
    older = run / "checkpoints" / "step-00000001"
    latest = run / "checkpoints" / "step-00000002"
    assert line.endswith(f"the newest older checkpoint, {older} (step 1), is intact: move the damaged one aside "
                         f"(mv {latest} {latest}.damaged) to resume from it"), line
    assert fingerprint(run) == before


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_exporting_a_damaged_checkpoint_names_the_tensor_and_the_file_and_overwrites_nothing(
        trained, tmp_path, damage):
    _, run, (file, what) = damaged_copy(trained, tmp_path, damage)
    target = tmp_path / "exported"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"an earlier export")
    (target / "ringpipe-export.json").write_text(json.dumps({"run": str(run)}))  # of this run
    line = one_error_line(run_cli("export", run, "--out", target))
    assert file in line and what in line, line
    assert line.endswith(f"(step 1), is intact: move the damaged one aside (mv {run}/checkpoints/step-00000002 "
                         f"{run}/checkpoints/step-00000002.damaged) to export it"), line
    assert sorted(os.listdir(target)) == ["model.safetensors", "ringpipe-export.json"]
    assert (target / "model.safetensors").read_bytes() == b"an earlier export"


def test_an_error_beside_an_intact_latest_checkpoint_names_no_other_checkpoint(trained):
    _, out = trained
    latest = find_checkpoint(str(out))
    assert fallback_hint(str(out), f"tensor x of {latest}/rank-00000.safetensors: a failure elsewhere") == ""


def test_following_the_hint_resumes_from_the_older_checkpoint(trained, tmp_path):
    corpus, run, _ = damaged_copy(trained, tmp_path, wrong_checksum)
    latest = run / "checkpoints" / "step-00000002"
    os.rename(latest, f"{latest}.damaged")
    result = run_cli("train", "--data", corpus, "--resume", "--steps", 3, "--nproc", 2, "--tp", 2, "--out", run)
    assert result.exit_code == 0, result.output
    assert find_checkpoint(str(run)).endswith("step-00000003")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage, named", [(wrong_checksum, "checkpoint"), (short_piece, "run")],
                         ids=["wrong_checksum-checkpoint", "short_piece-run"])
def test_generating_across_workers_from_a_damaged_checkpoint_is_one_line_naming_the_intact_older_one(
        trained, tmp_path, damage, named):
    _, run, (file, what) = damaged_copy(trained, tmp_path, damage)
    for name in ("config.json", "model.safetensors"):  # a run stopped before its final model: generate reads
        (run / name).unlink(missing_ok=True)          # its newest checkpoint
    latest = run / "checkpoints" / "step-00000002"
    line = one_error_line(run_cli("generate", "--checkpoint", run if named == "run" else latest,
                                  "--max-new-tokens", 2, "--nproc", 2, "--pp", 2))
    assert file in line and what in line and "remote traceback" not in line and 'File "' not in line, line
    assert line.endswith(f"the newest older checkpoint, {run / 'checkpoints' / 'step-00000001'} (step 1), is "
                         f"intact: move the damaged one aside (mv {latest} {latest}.damaged) to generate from it")


def test_quantize_reads_the_newest_checkpoint_of_a_run_stopped_before_its_final_model(trained, tmp_path):
    _, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for name in ("config.json", "model.safetensors"):
        (run / name).unlink(missing_ok=True)
    result = run_cli("quantize", run, "--int8")
    assert result.exit_code == 0 and f"of {run / 'checkpoints' / 'step-00000002'} to int8" in result.output, \
        result.output
    result = run_cli("generate", "--checkpoint", f"{run}-int8", "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output


def test_quantizing_a_damaged_latest_checkpoint_names_the_intact_older_one(trained, tmp_path):
    _, run, (file, what) = damaged_copy(trained, tmp_path, wrong_checksum)
    for name in ("config.json", "model.safetensors"):
        (run / name).unlink(missing_ok=True)
    line = one_error_line(run_cli("quantize", run, "--int8"))
    assert file in line and what in line and line.endswith("to quantize it"), line


def test_generating_in_one_process_from_a_damaged_checkpoint_names_the_intact_older_one(trained, tmp_path):
    _, run, (file, what) = damaged_copy(trained, tmp_path, wrong_checksum)
    for name in ("config.json", "model.safetensors"):
        (run / name).unlink(missing_ok=True)
    line = one_error_line(run_cli("generate", "--checkpoint", run, "--max-new-tokens", 2))
    assert file in line and what in line and line.endswith("(step 1), is intact: move the damaged one aside "
                                                           f"(mv {run}/checkpoints/step-00000002 {run}/checkpoints/"
                                                           "step-00000002.damaged) to generate from it"), line

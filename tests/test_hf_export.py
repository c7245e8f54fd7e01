"""The Hugging Face export of a sharded checkpoint: streamed in bounded chunks, the single-process
model file byte for byte (GPT-2, BERT, T5), opened by transformers with the same logits; `ringpipe export`."""
import tracemalloc

import numpy as np
import pytest

from ringpipe.model.gpt2.model import GPT
from ringpipe.model.training.checkpoint_metadata import commit
from ringpipe.model.training.hf_export import export_model, stream_tensors
from ringpipe.model.training.parallel_trainer import Layout
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime.files import load_tensors
from tests.conftest import run_cli
from tests.test_sharded_checkpoint import full_state, save, spawn, tiny_config

MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.timeout(120)
def test_the_export_is_the_single_process_model_file_byte_for_byte_and_transformers_gives_its_logits(
        tmp_path, local_cluster):
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    tokenizer = Trainer.create(config, str(run)).tokenizer
    layout = Layout(tp=2, pp=2)
    trainers = spawn(local_cluster(4), config, layout, str(run), tokenizer.vocab_size)
    trainers.train_step(0).result()
    checkpoint = save(trainers, run, 1, config, layout, tokenizer)
    params, _ = full_state(trainers)
    gpt = GPT(config.model_config(tokenizer.vocab_size), params=params)
    gpt.save_pretrained(tmp_path / "whole", tokenizer=tokenizer)  # what one process holding it all writes
    # chunks of 1000 bytes: the larger tensors cross chunk and tensor-parallel piece boundaries
    export_model(checkpoint, str(tmp_path / "streamed"), chunk_bytes=1000)
    assert run_cli("export", run, "--out", tmp_path / "cli").exit_code == 0
    for name in MODEL_FILES:
        assert read(tmp_path / "streamed" / name) == read(tmp_path / "whole" / name), name
        assert read(tmp_path / "cli" / name) == read(tmp_path / "whole" / name), name
    load_tensors(tmp_path / "streamed" / "model.safetensors")  # its checksums verify

    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "streamed").eval()
    idx = np.arange(16).reshape(2, 8) % tokenizer.vocab_size
    with torch.no_grad():
        logits = model(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(logits, gpt.forward(idx), rtol=1e-10, atol=1e-10)


FAMILY_RUNS = {  # family: TrainConfig settings (float64, so every transposed and split tensor has 8-byte items)
    "bert": dict(family="bert", tokenizer="byte", n_layer=2, n_head=2, n_embd=16, block_size=12, next_sentence=True),
    "t5": dict(family="t5", n_layer=2, n_head=2, n_embd=8, block_size=20, feed_forward_proj="gated-gelu", n_inner=12),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(FAMILY_RUNS))
def test_bert_and_t5_exports_are_their_single_process_model_files_byte_for_byte(tmp_path, local_cluster, name):
    """Their fused q|k|v (and T5's gated wi_0|wi_1, cross k|v) leave as transposed column ranges of the
    stored shards, streamed a chunk at a time."""
    import dataclasses

    from ringpipe.model.families import family, special_ids
    from ringpipe.model.t5.family import encoder_decoder_split
    from ringpipe.model.training.config import TrainConfig
    from ringpipe.model.training.parallel_trainer import ParallelTrainer
    from tests.conftest import TEXT

    (tmp_path / "corpus.txt").write_text(TEXT)
    config = TrainConfig(data=str(tmp_path / "corpus.txt"), batch_size=4, microbatches=2, steps=1, eval_iters=1,
                         dtype="float64", **FAMILY_RUNS[name])
    model_family, run = family(name), tmp_path / "run"
    tokenizer = Trainer.create(config, str(run)).tokenizer
    layout = Layout(tp=2, pp=2, split=encoder_decoder_split(config.model, 2, 1) if name == "t5" else None)
    trainers = local_cluster(4).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(run / "tokens.bin"), tokenizer.vocab_size,
                                      special_ids=special_ids(tokenizer, model_family))
    trainers.train_step(0).result()
    checkpoint = save(trainers, run, 1, config, layout, tokenizer)
    params, _ = full_state(trainers)
    model = model_family.model(config.model_config(tokenizer.vocab_size), params=params)
    model.save_pretrained(tmp_path / "whole", tokenizer=tokenizer)  # what one process holding it all writes
    export_model(checkpoint, str(tmp_path / "streamed"), chunk_bytes=1000)
    for file in MODEL_FILES:
        assert read(tmp_path / "streamed" / file) == read(tmp_path / "whole" / file), file


def test_export_streams_a_tensor_larger_than_its_chunk_without_holding_it(tmp_path):
    from ringpipe.model.training.sharded_checkpoint import write_pieces

    rows, columns = 4096, 4096  # float32: 64 MiB, twice the 32 MiB the issue allows a chunk; ours are 1 MiB
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    reports = []
    for rank in range(2):  # two column halves, as tensor parallelism would store them
        half = np.full((rows, columns // 2), rank + 1, np.float32)
        half[:, 0] = np.arange(rows)
        piece = {"tensor": "big", "param": "big", "role": "weight", "shape": [rows, columns], "dtype": "float32",
                 "offsets": [0, rank * columns // 2], "lengths": [rows, columns // 2], "key": f"big@{rank}",
                 "array": half}
        reports.append({"pieces": write_pieces(str(checkpoint), rank, [piece])})
        del half, piece
    commit(str(checkpoint), reports, step=1, config={}, model={}, layout={}, optimizer={"step": 1})
    out = str(tmp_path / "big.safetensors")
    tracemalloc.start()
    try:
        # the whole tensor, and (as BERT's and T5's fused weights leave) columns 1..2048, transposed
        stream_tensors(out, str(checkpoint), {"big": "big", "part": ("big", slice(1, columns // 2 + 1), True)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB while exporting a 64 MiB tensor and 32 MiB of its columns"
    from safetensors import safe_open

    with safe_open(out, framework="numpy") as f:
        rows_seen = f.get_slice("big")[4000:4002]
        part = f.get_slice("part")
        assert part.get_shape() == [columns // 2, rows]
        part_rows = part[columns // 2 - 2:]  # columns 2047 and 2048 of "big": the end of one piece, the next's first
    assert rows_seen.shape == (2, columns)
    assert rows_seen[0, 0] == 4000 and rows_seen[0, columns // 2] == 4000 and rows_seen[1, -1] == 2
    assert (part_rows[0] == 1).all() and (part_rows[1] == np.arange(rows)).all()


def test_ringpipe_export_of_a_consolidated_checkpoint_writes_what_the_trainer_writes(tmp_path):
    from tests.conftest import one_error_line
    from tests.test_sharded_checkpoint import tiny_config

    run = tmp_path / "run"
    trainer = Trainer.create(tiny_config(tmp_path), str(run))
    trainer.train_step(0)
    trainer.save_checkpoint()
    trainer.save_model()
    assert run_cli("export", run, "--out", tmp_path / "exported").exit_code == 0
    for name in MODEL_FILES:
        assert read(tmp_path / "exported" / name) == read(run / name), name
    assert "no checkpoint in" in one_error_line(run_cli("export", tmp_path / "nothing"))


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_ringpipe_export_of_a_consolidated_checkpoint_is_the_runs_own_model_byte_for_byte(tmp_path, name):
    # gpt2's case is the test above; T5's config.json once lost the run's block_size on the way
    from ringpipe.model.training.config import TrainConfig
    from tests.conftest import TEXT

    (tmp_path / "corpus.txt").write_text(TEXT)
    config = TrainConfig(data=str(tmp_path / "corpus.txt"), batch_size=2, steps=1, eval_iters=1, dtype="float64",
                         **FAMILY_RUNS[name])
    run = tmp_path / "run"
    trainer = Trainer.create(config, str(run))
    trainer.train_step(0)
    trainer.save_checkpoint()
    trainer.save_model()
    assert run_cli("export", run, "--out", tmp_path / "exported").exit_code == 0
    files = sorted(p.name for p in (tmp_path / "exported").iterdir() if p.name != "ringpipe-export.json")
    assert "model.safetensors" in files and "config.json" in files
    for file in files:
        assert read(tmp_path / "exported" / file) == read(run / file), file


def two_checkpointed_runs(tmp_path):
    """{"run", "other"}: two tiny runs with a checkpoint each, and the trainer of "other"."""
    from tests.test_sharded_checkpoint import tiny_config

    runs = {}
    for name in ("run", "other"):
        trainer = Trainer.create(tiny_config(tmp_path), str(tmp_path / name))
        trainer.train_step(0)
        trainer.save_checkpoint()
        runs[name] = tmp_path / name
    return runs, trainer


def test_ringpipe_export_refuses_an_out_holding_another_run_or_other_files_and_changes_nothing(tmp_path):
    from tests.conftest import one_error_line

    runs, trainer = two_checkpointed_runs(tmp_path)
    trainer.save_model()  # "other" has a final model of its own
    before = {name: read(runs["other"] / name) for name in MODEL_FILES}
    line = one_error_line(run_cli("export", runs["run"], "--out", runs["other"]))
    assert line.startswith("Error: Invalid value for --out") and "is another run's directory" in line, line
    assert {name: read(runs["other"] / name) for name in MODEL_FILES} == before
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("mine")
    assert "holds other files (todo.txt)" in one_error_line(run_cli("export", runs["run"], "--out", unrelated))
    assert sorted(p.name for p in unrelated.iterdir()) == ["todo.txt"]
    # allowed: RUN_DIR itself, a new directory, and that earlier export again
    for out in (runs["run"], tmp_path / "exported", tmp_path / "exported"):
        assert run_cli("export", runs["run"], "--out", out).exit_code == 0, out


def test_ringpipe_export_refuses_an_out_holding_another_runs_export_and_changes_nothing(tmp_path):
    from tests.conftest import one_error_line

    runs, _ = two_checkpointed_runs(tmp_path)
    exported = tmp_path / "exported"
    assert run_cli("export", runs["other"], "--out", exported).exit_code == 0
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    result = run_cli("export", runs["run"], "--out", exported)
    line = one_error_line(result)
    assert result.exit_code == 2 and line.startswith("Error: Invalid value for --out"), result.output
    assert f"holds the export of another run ({runs['other']})" in line, line
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before
    (exported / "ringpipe-export.json").unlink()  # model files whose run nobody can tell
    assert "model files without ringpipe-export.json" in one_error_line(run_cli("export", runs["run"], "--out", exported))

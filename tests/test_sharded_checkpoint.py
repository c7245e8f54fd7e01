"""Sharded checkpoints: each rank writes what it owns, any layout resumes bit for bit, a save is
visible only once committed, and old checkpoints go only after a newer one is committed."""
import dataclasses
import os

import numpy as np
import pytest

from ringpipe.model.parallel.tensor_parallel import assemble_full_optimizer_state, assemble_full_params
from ringpipe.model.parallel.tensor_parallel.sharding import Sharding, shard
from ringpipe.model.training.checkpoint_metadata import read_metadata
from ringpipe.model.training.checkpoint_pieces import (box_slices, flat_range_boxes, local_to_global,
                                                       shard_boxes)
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.run_dir import find_checkpoint, sharded_checkpoints
from ringpipe.model.training.sharded_checkpoint import save_sharded_checkpoint
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

SAVED_AT = {"tp2-pp2": Layout(tp=2, pp=2), "dp2-tp2-zero": Layout(dp=2, tp=2, zero=1),
            "dp2-pp2-zero": Layout(dp=2, pp=2, zero=1)}
RESUMED_AT = {"single": Layout(), "dp2-pp2-zero": Layout(dp=2, pp=2, zero=1), "tp2-pp2": Layout(tp=2, pp=2),
              "tp4": Layout(tp=4)}


def tiny_config(directory) -> TrainConfig:
    corpus = directory / "corpus.txt"
    corpus.write_text(TEXT)
    # n_head 4 for tp 4; a vocabulary not divisible by 4, so the vocab-parallel padding is exercised
    return TrainConfig(data=str(corpus), n_layer=2, n_head=4, n_embd=16, block_size=8, batch_size=8, microbatches=2,
                       steps=4, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1, dtype="float64", grad_clip=0.5,
                       weight_decay=0.1)


def spawn(cluster, config, layout, run_dir, vocab):
    return cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                         os.path.join(run_dir, "tokens.bin"), vocab, bucket_bytes=4 << 10)


def full_state(trainers) -> tuple[dict, dict]:
    tables = trainers.shard_table().result()
    return (assemble_full_params(trainers.local_params().result(), tables),
            assemble_full_optimizer_state(trainers.optimizer_state().result(), tables))


def save(trainers, run, step, config, layout, tokenizer, keep=3):
    return save_sharded_checkpoint(trainers, str(run), step, config=dataclasses.asdict(config),
                                   model=config.model_config(tokenizer.vocab_size), layout=dataclasses.asdict(layout),
                                   tokenizer=tokenizer, keep=keep)


@pytest.fixture(scope="module", params=list(SAVED_AT))
def saved(request, tmp_path_factory, local_cluster_pool):
    """A run trained 2 steps at a layout and checkpointed; its full state then, and after step 3."""
    layout = SAVED_AT[request.param]
    run = tmp_path_factory.mktemp(request.param)
    config = tiny_config(run)
    tokenizer = Trainer.create(config, str(run)).tokenizer  # writes tokens.bin
    trainers = spawn(local_cluster_pool.get(4), config, layout, str(run), tokenizer.vocab_size)
    for step in range(2):
        trainers.train_step(step).result()
    checkpoint = save(trainers, run, 2, config, layout, tokenizer)
    params, optimizer = full_state(trainers)
    trainers.train_step(2).result()
    after, _ = full_state(trainers)
    return dict(layout=layout, run=str(run), config=config, vocab=tokenizer.vocab_size, checkpoint=checkpoint,
                params=params, optimizer=optimizer, after=after)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resume", list(RESUMED_AT))
def test_any_layout_resumes_weights_and_moments_to_the_bit_and_continues_the_run(saved, resume, local_cluster):
    layout = RESUMED_AT[resume]
    trainers = spawn(local_cluster(layout.world_size), saved["config"], layout, saved["run"], saved["vocab"])
    assert set(trainers.load_state(saved["checkpoint"]).result()) == {2}
    params, optimizer = full_state(trainers)
    assert sorted(params) == sorted(saved["params"]) and sorted(optimizer) == sorted(saved["optimizer"])
    for name, value in {**saved["params"], **saved["optimizer"]}.items():
        np.testing.assert_array_equal((params | optimizer)[name], value, err_msg=name)
    trainers.train_step(2).result()
    after, _ = full_state(trainers)
    for name, value in saved["after"].items():
        if layout == saved["layout"]:  # the same layout repeats the uninterrupted run exactly
            np.testing.assert_array_equal(after[name], value, err_msg=name)
        else:  # another layout sums in another order
            np.testing.assert_allclose(after[name], value, rtol=1e-10, atol=1e-13, err_msg=name)


def test_replicas_write_each_piece_once_spread_over_the_data_parallel_ranks(saved):
    metadata = read_metadata(saved["checkpoint"])
    weights = {name: t for name, t in metadata["tensors"].items() if t["role"] == "weight"}
    # every element of every tensor is stored once (commit refuses overlaps and gaps)...
    stored = sum(p["nbytes"] for t in metadata["tensors"].values() for p in t["pieces"])
    assert stored == 3 * sum(p.nbytes for p in saved["params"].values())
    # ...and by every rank, not by rank 0 alone
    writers = {p["file"] for t in weights.values() for p in t["pieces"]}
    assert writers == {f"rank-{r:05d}.safetensors" for r in range(4)}
    assert metadata["step"] == 2 and metadata["layout"]["dp"] == saved["layout"].dp


# ---- where pieces lie ---------------------------------------------------------------------------------
def test_a_flat_range_cut_into_boxes_holds_exactly_its_elements_in_order():
    for shape in [(5, 7), (2, 3, 4), (11,)]:
        a = np.arange(np.prod(shape)).reshape(shape)
        for start in range(a.size):
            for stop in range(start + 1, a.size + 1):
                boxes = flat_range_boxes(shape, start, stop)
                values = np.concatenate([a[box_slices(*box)].ravel() for box in boxes])
                np.testing.assert_array_equal(values, np.arange(start, stop))


@pytest.mark.parametrize("full,axis,parts,tp", [((10, 4), 0, 1, 4), ((4, 12), 1, 3, 2), ((7, 3), 0, 1, 2)])
def test_shard_boxes_place_every_tensor_parallel_shard_in_the_full_tensor(full, axis, parts, tp):
    a = np.random.default_rng(0).normal(size=full)
    for rank in range(tp):
        local = shard(a, Sharding("column", axis, parts), rank, tp)
        pairs = shard_boxes(full, axis, parts, rank, tp)
        for start in range(0, local.size, 3):  # ZeRO-1's flat ranges of the shard, too
            for box in flat_range_boxes(local.shape, start, min(local.size, start + 5)):
                for mine, where in local_to_global(box, pairs):
                    np.testing.assert_array_equal(local[box_slices(*mine)], a[box_slices(*where)])


# ---- commit, crash, keep ------------------------------------------------------------------------------
def die_while_writing(comm):
    """Installed on one worker: its next piece file is left half written, then it is SIGKILLed."""
    import signal

    import ringpipe.model.training.sharded_checkpoint as sharded
    from ringpipe.runtime.files import temporary_name

    def write_and_die(path, tensors, metadata=None):
        with open(temporary_name(path), "wb") as f:
            f.write(b"half a piece")
        os.kill(os.getpid(), signal.SIGKILL)

    sharded.save_tensors = write_and_die


@pytest.mark.timeout(120)
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_and_nothing_visible(tmp_path):
    from ringpipe.cluster.distributed_train import DistributedRun
    from ringpipe.runtime import WorkerLost

    config = tiny_config(tmp_path)
    out = str(tmp_path / "run")
    run = DistributedRun(config, Layout(pp=2), out, keep_checkpoints=1)
    try:
        run.train_step(0)
        first = run.save_checkpoint()
        run.train_step(1)
        run.cluster.run(die_while_writing, ranks=[1])
        with pytest.raises(WorkerLost, match="SIGKILL"):
            run.save_checkpoint()
    finally:
        run.close()
    assert find_checkpoint(out) == first  # keep 1: the older one goes only after a newer commit
    unfinished = sharded_checkpoints(out, committed=False)
    assert [step for step, _ in unfinished] == [2]  # never visible...
    resumed = DistributedRun(config, Layout(tp=2), out, resume=True)
    try:
        assert resumed.step == 1
        assert sharded_checkpoints(out, committed=False) == []  # ...and gone at the next start
    finally:
        resumed.close()


def test_keep_checkpoints_deletes_older_ones_only_after_a_newer_one_is_committed(local_cluster, tmp_path):
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    tokenizer = Trainer.create(config, str(run)).tokenizer
    trainers = spawn(local_cluster(1), config, Layout(), str(run), tokenizer.vocab_size)
    for step in (1, 2):
        save(trainers, run, step, config, Layout(), tokenizer, keep=2)
    assert [step for step, _ in sharded_checkpoints(str(run))] == [1, 2]
    trainers.train_step(0).result()
    save(trainers, run, 3, config, Layout(), tokenizer, keep=2)
    assert [step for step, _ in sharded_checkpoints(str(run))] == [2, 3]
    assert find_checkpoint(str(run)).endswith("step-00000003")


# ---- consolidated checkpoints (single-process runs, and every run before sharding) -----------------------
def test_a_consolidated_checkpoint_with_a_flat_trainer_json_still_loads_into_any_layout(local_cluster, tmp_path):
    import json

    from ringpipe.model.training.run_dir import read_trainer_state

    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    single = Trainer.create(config, str(run))
    for step in range(2):
        single.train_step(step)
    checkpoint = single.save_checkpoint()
    state_file = os.path.join(checkpoint, "trainer.json")
    with open(state_file, "w") as f:  # as early versions wrote it: the model's options beside the run's
        json.dump({"step": 2, "config": config.flat()}, f)
    assert read_trainer_state(checkpoint)["config"] == config
    layout = Layout(tp=2, pp=2)
    trainers = spawn(local_cluster(4), config, layout, str(run), single.tokenizer.vocab_size)
    assert set(trainers.load_state(checkpoint).result()) == {2}
    params, optimizer = full_state(trainers)
    for name, value in {**single.params_on_host(), **single.optimizer.state_dict()}.items():
        np.testing.assert_array_equal((params | optimizer)[name], value, err_msg=name)


# ---- through `ringpipe train` -----------------------------------------------------------------------------
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
        "--eval-iters", "1", "--dtype", "float64"]


@pytest.mark.timeout(120)
def test_ringpipe_train_keeps_the_newest_checkpoints_and_ends_with_the_model_streamed_from_the_last(corpus, tmp_path):
    from ringpipe.model.gpt2.model import GPT
    from ringpipe.model.training.sharded_checkpoint import load_consolidated
    from tests.conftest import run_cli

    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, *TINY, "--steps", 3, "--checkpoint-every", 1, "--keep-checkpoints", 2,
                     "--nproc", 2, "--pp", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert [step for step, _ in sharded_checkpoints(str(out))] == [2, 3]
    _, params, _ = load_consolidated(find_checkpoint(str(out)))
    model = GPT.from_pretrained(out).params
    for name, value in params.items():
        np.testing.assert_array_equal(model[name], value, err_msg=name)


def test_keep_checkpoints_is_refused_where_a_single_process_keeps_one(corpus, tmp_path):
    from tests.conftest import one_error_line, run_cli

    out = tmp_path / "run"
    line = one_error_line(run_cli("train", "--data", corpus, *TINY, "--steps", 1, "--keep-checkpoints", 2,
                                  "--out", out))
    assert "--keep-checkpoints" in line and not out.exists()


def test_the_checkpoint_with_more_steps_is_the_one_a_run_resumes_from(tmp_path):
    import json

    run = tmp_path / "run"
    for step, path in ((2, run / "checkpoints" / "step-00000002"), (3, run / "checkpoints" / "step-00000003")):
        path.mkdir(parents=True)
        (path / "checkpoint.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "step-00000009").mkdir()  # unfinished: no commit file
    consolidated = run / "checkpoint"
    consolidated.mkdir()
    (consolidated / "trainer.json").write_text(json.dumps({"step": 2, "config": {}}))
    assert find_checkpoint(str(run)).endswith("step-00000003")
    (consolidated / "trainer.json").write_text(json.dumps({"step": 4, "config": {}}))  # a later single-process run
    assert find_checkpoint(str(run)) == str(consolidated)


@pytest.mark.timeout(120)
def test_a_family_without_hugging_face_names_checkpoints_under_its_own_and_exports_whole(local_cluster, tmp_path):
    from ringpipe.model.families import family, special_ids
    from ringpipe.model.training.hf_export import export_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = TrainConfig(family="bert", data=str(corpus), tokenizer="byte", n_layer=1, n_head=2, n_embd=16,
                         block_size=12, batch_size=4, microbatches=1, steps=2, eval_iters=1, dtype="float64")
    run = tmp_path / "run"
    tokenizer = Trainer.create(config, str(run)).tokenizer
    bert = family("bert")
    layout = Layout(tp=2)
    trainers = local_cluster(2).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                      str(run / "tokens.bin"), tokenizer.vocab_size,
                                      special_ids=special_ids(tokenizer, bert))
    trainers.train_step(0).result()
    checkpoint = save(trainers, run, 1, config, layout, tokenizer)
    params, _ = full_state(trainers)
    weights = {name for name, t in read_metadata(checkpoint)["tensors"].items() if t["role"] == "weight"}
    assert weights == set(params)  # its plan gives no Hugging Face names: ringpipe's own
    export_checkpoint(checkpoint, str(tmp_path / "exported"))
    model_config, loaded = bert.load_checkpoint(str(tmp_path / "exported"))
    assert model_config.n_layer == 1 and sorted(loaded) == sorted(params)
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)

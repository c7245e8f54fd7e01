import json
import os

import numpy as np
import pytest
import tokenizers
from click.testing import CliRunner

from ringpipe.cluster.cli import main
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import find_checkpoint, saved_config
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime.files import FileWriteError
from tests.conftest import TEXT



def tiny_config(corpus, **overrides) -> TrainConfig:
    settings = dict(data=corpus, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                    steps=6, warmup=2, lr=1e-2, min_lr=1e-3, eval_iters=2, dtype="float64")
    settings.update(overrides)
    return TrainConfig(**settings)


def params_of(trainer):
    return trainer.params_on_host()


def test_microbatch_accumulation_equals_one_big_batch(corpus, tmp_path):
    whole = Trainer.create(tiny_config(corpus), str(tmp_path / "whole"))
    split = Trainer.create(tiny_config(corpus, microbatches=4), str(tmp_path / "split"))
    for step in range(3):
        loss_whole = whole.train_step(step)["loss"]
        loss_split = split.train_step(step)["loss"]
        assert loss_split == pytest.approx(loss_whole, rel=1e-12)
    for name, value in params_of(whole).items():
        np.testing.assert_allclose(params_of(split)[name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resume_equals_uninterrupted_run_bitwise(corpus, tmp_path, dtype):
    config = dict(dtype=dtype, dropout=0.1, microbatches=2)
    straight = Trainer.create(tiny_config(corpus, **config), str(tmp_path / "straight"))
    for step in range(6):
        straight.train_step(step)

    run_dir = str(tmp_path / "interrupted")
    first = Trainer.create(tiny_config(corpus, **config), run_dir)
    for step in range(3):
        first.train_step(step)
    first.save_checkpoint()
    del first
    resumed = Trainer.resume(saved_config(run_dir), run_dir)
    assert resumed.step == 3
    for step in range(resumed.step, 6):
        resumed.train_step(step)
    for name, value in params_of(straight).items():
        assert params_of(resumed)[name].dtype == np.dtype(dtype)
        assert np.array_equal(params_of(resumed)[name], value), name


def test_evaluate_is_deterministic_and_near_log_vocab_at_init(corpus, tmp_path):
    trainer = Trainer.create(tiny_config(corpus), str(tmp_path / "run"))
    val_loss = trainer.evaluate()["val_loss"]
    assert val_loss == trainer.evaluate()["val_loss"]
    assert abs(val_loss - np.log(trainer.tokenizer.vocab_size)) < 0.5


def test_failed_checkpoint_save_leaves_the_previous_checkpoint_intact(corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    trainer = Trainer.create(tiny_config(corpus), run_dir)
    trainer.train_step(0)
    trainer.save_checkpoint()
    trainer.train_step(1)

    def fail():
        raise OSError("disk full")

    trainer.optimizer.state_dict = fail
    with pytest.raises(FileWriteError, match="checkpoint: disk full"):
        trainer.save_checkpoint()
    assert sorted(os.listdir(run_dir)) == ["checkpoint", "tokens.bin"]
    assert Trainer.resume(saved_config(run_dir), run_dir).step == 1


def test_an_interrupted_checkpoint_swap_falls_back_to_the_previous_one(corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    trainer = Trainer.create(tiny_config(corpus), run_dir)
    trainer.save_checkpoint()
    # The state between the two renames of a swap: only the previous checkpoint exists.
    os.replace(os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "checkpoint.old"))
    assert find_checkpoint(run_dir).endswith("checkpoint.old")
    trainer.save_checkpoint()
    assert sorted(os.listdir(run_dir)) == ["checkpoint", "tokens.bin"]


TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
              "--batch-size", "4", "--warmup", "1", "--eval-iters", "2"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_then_generate_end_to_end(corpus, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 4, "--eval-every", 2,
                     "--checkpoint-every", 2, "--out", out)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]  # 1-based, as the progress line counts
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert ["val_loss" in line for line in lines] == [False, True, False, True]
    assert GPT.from_pretrained(str(out)).config.vocab_size == len(set(TEXT))
    assert (out / "tokenizer.json").exists() and (out / "checkpoint").is_dir()
    hf_tokenizer = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert hf_tokenizer.encode(TEXT[:50]).ids == load_tokenizer(str(out)).encode(TEXT[:50]).tolist()

    result = run_cli("generate", "--checkpoint", out, "--prompt", "3 little", "--max-new-tokens",
                     20, "--seed", 1)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("3 little") and len(result.output) == len("3 little") + 21


def test_a_run_directory_with_ringpipes_earlier_tokenizer_file_resumes_and_generates(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 2, "--out", out).exit_code == 0
    # Earlier versions wrote their own tokenizer.json, and no other tokenizer file.
    old_format = json.dumps({"type": "char", "chars": "".join(sorted(set(TEXT)))})
    for directory in (out, out / "checkpoint"):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink()
        (directory / "tokenizer.json").write_text(old_format)
    result = run_cli("generate", "--checkpoint", out, "--prompt", "3 little", "--max-new-tokens", 5)
    assert result.exit_code == 0 and result.output.startswith("3 little"), result.output
    result = run_cli("train", "--resume", "--data", corpus, *TINY_FLAGS, "--steps", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3  # 1-based


def test_resume_continues_the_run_and_keeps_metrics_consistent(corpus, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 3, "--out", out).exit_code == 0
    result = run_cli("train", "--resume", "--out", out, "--steps", 5)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert saved_config(str(out)).steps == 5


def _bad_cases(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefgh" * 3)
    return {
        "empty corpus": (["train", "--data", empty], "empty"),
        "corpus too small": (["train", "--data", tiny], "too small"),
        "block size larger than data": (["train", "--data", corpus, "--block-size", 2000],
                                        "block size 2000"),
        "no files matched": (["train", "--data", tmp_path / "*.nothing"], "no files matched"),
        "n_embd not divisible by n_head": (["train", "--data", corpus, "--n-embd", 10,
                                            "--n-head", 3], "--n-embd 10"),
        "microbatches not dividing batch": (["train", "--data", corpus, "--microbatches", 5],
                                            "microbatches"),
        "unknown dtype": (["train", "--data", corpus, "--dtype", "float16"], "--dtype"),
        "unknown tokenizer": (["train", "--data", corpus, "--tokenizer", "words"], "--tokenizer"),
        "unknown sampler": (["train", "--data", corpus, "--sampler", "shuffle"], "--sampler"),
        "missing checkpoint on resume": (["train", "--resume", "--out", tmp_path / "none"],
                                         "no checkpoint"),
        "missing generate checkpoint": (["generate", "--checkpoint", tmp_path / "none"],
                                        "does not exist"),
    }


BAD_CASES = [
    "empty corpus", "corpus too small", "block size larger than data", "no files matched",
    "n_embd not divisible by n_head", "microbatches not dividing batch", "unknown dtype",
    "unknown tokenizer", "unknown sampler", "missing checkpoint on resume", "missing generate checkpoint"]


def assert_one_line_error(result, expected, with_usage=False):
    """Exit status non-zero, one "Error: ..." line naming `expected`, no traceback; click's own
    flag-value checks also print a usage hint (`with_usage`)."""
    assert result.exit_code != 0
    # Status lines ("tokenizing corpus.txt ...") may come before the error.
    lines = [line for line in result.output.strip().splitlines() if not line.endswith(" ...")]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert with_usage or len(lines) == 1, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_a_one_line_error_and_writes_nothing(tmp_path, corpus, case):
    args, expected = _bad_cases(tmp_path, corpus)[case]
    out = tmp_path / "out"
    if "--out" not in args and args[0] == "train":
        args = args + ["--out", out]
    result = run_cli(*args)
    assert_one_line_error(result, expected, with_usage=case.startswith("unknown"))
    assert not out.exists()


@pytest.fixture
def trained(tmp_path, corpus):
    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_training_into_a_run_with_a_checkpoint_needs_resume(trained, corpus):
    result = run_cli("train", "--data", corpus, *TINY_FLAGS, "--out", trained)
    assert_one_line_error(result, "--resume")


def test_resume_rejects_another_tokenizer(trained):
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--tokenizer", "byte"),
                          "--tokenizer")


def test_resume_rejects_data_outside_the_char_vocabulary(trained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("ZZZ QQQ XXX\n" * 200)
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--data", other, "--steps", 4),
                          "tokenizer")


def test_resume_rejects_changed_model_shape(trained):
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--n-layer", 3),
                          "--n-layer")


def test_resume_rejects_a_checkpoint_whose_model_options_differ_from_the_run(corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    Trainer.create(tiny_config(corpus), run_dir).save_checkpoint()
    config_path = os.path.join(find_checkpoint(run_dir), "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["layer_norm_epsilon"] = 1e-3  # a model the run's flags do not describe
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="layer_norm_epsilon 0.001"):
        Trainer.resume(saved_config(run_dir), run_dir)


def test_resume_rejects_another_sampler(trained):
    # The batches of the remaining steps would differ from the uninterrupted run's.
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--sampler", "random"),
                          "--sampler")


def test_a_checkpoint_from_before_the_sampler_setting_resumes_with_random_windows(trained):
    state_file = trained / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    assert state["config"].pop("sampler") == "epoch"
    state_file.write_text(json.dumps(state))
    assert saved_config(trained).sampler == "random"  # what that run drew its batches with


def test_a_checkpoint_holds_the_model_options_under_model(trained):
    config = json.loads((trained / "checkpoint" / "trainer.json").read_text())["config"]
    assert (config["model"]["n_layer"], config["model"]["n_embd"]) == (1, 16)
    assert "n_layer" not in config and config["dtype"] == "float32"  # the run's precision recipe
    assert saved_config(trained) == TrainConfig(**config)


def flatten_model_options(run):
    """Rewrite the run's trainer.json as versions before `TrainConfig.model` wrote it: flat."""
    state_file = run / "checkpoint" / "trainer.json"
    state = json.loads(state_file.read_text())
    state["config"] = {**state["config"].pop("model"), **state["config"]}
    state_file.write_text(json.dumps(state))


def test_a_checkpoint_with_flat_model_options_resumes(trained):
    flatten_model_options(trained)
    assert saved_config(trained).model.n_embd == 16
    result = run_cli("train", "--resume", "--out", trained, "--steps", 3)
    assert result.exit_code == 0, result.output
    config = json.loads((trained / "checkpoint" / "trainer.json").read_text())["config"]
    assert (config["model"]["n_layer"], config["model"]["n_embd"], config["steps"]) == (1, 16, 3)


def test_resume_of_a_flat_checkpoint_rejects_a_changed_model_shape(trained):
    flatten_model_options(trained)
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--n-embd", 32), "--n-embd")


def test_corrupt_checkpoint_gives_a_one_line_error(trained):
    weights = trained / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--steps", 4), "corrupt")
    (trained / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_cli("generate", "--checkpoint", trained), "cannot load")


def test_generate_rejects_a_prompt_outside_the_vocabulary(trained):
    assert_one_line_error(run_cli("generate", "--checkpoint", trained, "--prompt", "€"), "--prompt")


def test_progress_writes_plain_lines_when_not_a_terminal():
    import io

    from ringpipe.cluster.progress import Progress

    stream = io.StringIO()
    progress = Progress(first_step=0, total_steps=40, stream=stream)
    for step in range(1, 41):
        metrics = {"step": step, "loss": 1.0, "lr": 1e-3, "tokens": 10, "tokens_per_s": 5.0}
        if step == 11:  # between two regular lines
            metrics["val_loss"] = 2.0
        progress.update(metrics)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 22  # the first step, then every 2nd, + 1 val
    assert lines[0].startswith("step 1/40") and "ETA -:--" in lines[0]
    assert lines[-1].startswith("step 40/40 loss 1.0000") and "ETA 0:00" in lines[-1]
    assert any(line.endswith("val_loss 2.0000") for line in lines)


def test_resuming_a_finished_run_says_it_is_complete_and_how_to_train_further(trained):
    saved = {path: path.stat().st_mtime_ns for path in trained.rglob("*") if path.is_file()}
    result = run_cli("train", "--resume", "--out", trained)
    assert result.exit_code == 0, result.output
    assert "already complete at step 2" in result.output and "--steps" in result.output, result.output
    assert "saved model" not in result.output
    # nothing trained, nothing re-saved
    assert {path: path.stat().st_mtime_ns for path in trained.rglob("*") if path.is_file()} == saved


def test_resuming_with_fewer_steps_than_the_run_completed_is_refused(trained):
    assert_one_line_error(run_cli("train", "--resume", "--out", trained, "--steps", 1), "--steps")


def test_metrics_from_before_one_based_steps_are_renumbered_on_resume(trained):
    metrics = trained / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({**row, "step": row["step"] - 1}) + "\n" for row in rows))  # old files
    result = run_cli("train", "--resume", "--out", trained, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_eta_is_a_moving_average_that_leaves_out_the_warm_up_step(monkeypatch):
    import io

    from ringpipe.cluster import progress as progress_module

    clock = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    stream = io.StringIO()
    progress = progress_module.Progress(first_step=0, total_steps=100, stream=stream)
    progress.plain_every = 1
    clock.now = 60.0  # step 1 pays for warm-up: a minute
    progress.update({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens": 1000})
    assert "ETA -:--" in stream.getvalue().splitlines()[-1]
    for step in range(2, 31):  # then 0.5 s a step, then 1 s a step
        clock.now += 0.5 if step <= 10 else 1.0
        progress.update({"step": step, "loss": 1.0, "lr": 1e-3, "tokens": 1000})
    last = stream.getvalue().splitlines()[-1]
    assert "1,000 tok/s" in last and "ETA 1:10" in last, last  # 70 steps left at the last 20 steps' 1 s


def test_a_progress_line_on_a_terminal_is_ended_before_other_output():
    import io

    from ringpipe.cluster.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(first_step=0, total_steps=10, stream=stream)
    progress.update({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens": 10})
    assert not stream.getvalue().endswith("\n")
    progress.end_line()
    progress.end_line()  # once only
    assert stream.getvalue().endswith("-:--\n") and stream.getvalue().count("\n") == 1


def test_ctrl_c_after_the_run_completed_says_nothing_is_lost(trained, capsys):
    from ringpipe.cluster.progress import report_interrupt

    config = saved_config(trained)  # 2 steps, both done and checkpointed
    report_interrupt(str(trained), config, {"trainer": None, "progress": None})
    assert capsys.readouterr().err.strip() == f"interrupted after the run completed: its model and checkpoint are in {trained}"

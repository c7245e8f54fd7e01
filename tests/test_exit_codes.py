"""Exit statuses of every ringpipe command: 2 for a usage error, whichever check finds it (click's own
or ringpipe's after parsing: a bad flag value, flags that conflict, a layout that does not fit the
model, a path that names nothing of the kind the command needs), as click and argparse-based
launchers (torchrun) give; 1 when the work itself fails (data or files that are unusable). Either
way one "Error: ..." line and no traceback."""
import pytest

from tests.conftest import TEXT, run_cli


def _cases(tmp_path):
    corpus, empty_corpus, empty_dir, bad_trace = (tmp_path / "corpus.txt", tmp_path / "empty.txt",
                                                  tmp_path / "empty", tmp_path / "trace")
    corpus.write_text(TEXT)
    empty_corpus.write_text("")
    empty_dir.mkdir()
    bad_trace.mkdir()
    (bad_trace / "trace-rank0.json").write_text("{")
    out = ["--out", tmp_path / "run"]
    return {
        # usage errors, exit 2
        "train: a flag value click refuses": (["train", "--lr", "nan", *out], 2, "--lr"),
        "train: flags that conflict": (["train", "--resume", "--overwrite", *out], 2, "--overwrite"),
        "train: a layout that does not fit --nproc": (["train", "--nproc", "3", "--dp", "2", *out], 2, "--nproc"),
        "train: micro-batches that do not divide the batch": (["train", "--data", corpus, "--microbatches", "5",
                                                               *out], 2, "microbatches"),
        "train: a model whose heads do not divide its width": (["train", "--data", corpus, "--n-embd", "10",
                                                                "--n-head", "3", *out], 2, "--n-embd 10"),
        "train: a layout that does not fit the model": (["train", "--data", corpus, "--n-layer", "1", "--nproc", "2",
                                                         "--pp", "2", *out], 2, "stage"),
        "train: an endpoint that is not HOST:PORT": (["train", "--launcher", "mpi", "--rdzv-endpoint", "::1:29500",
                                                      *out], 2, "--rdzv-endpoint"),
        "train: --data that names no file": (["train", "--data", tmp_path / "none*.txt", *out], 2, "no files matched"),
        "train: --resume of a directory without a checkpoint": (["train", "--resume", "--out", empty_dir], 2,
                                                                 "no checkpoint in"),
        "generate: --checkpoint without a model": (["generate", "--checkpoint", empty_dir], 2, "no checkpoint in"),
        "fill-mask: --checkpoint without a model": (["fill-mask", "--checkpoint", empty_dir, "a [MASK]"], 2,
                                                    "holds no model"),
        "export: RUN_DIR without a checkpoint": (["export", empty_dir], 2, "no checkpoint in"),
        "quantize: a missing required flag": (["quantize", empty_dir], 2, "--int8"),
        "quantize: RUN_DIR without a model": (["quantize", empty_dir, "--int8"], 2, "no checkpoint in"),
        "plan: ranks the hosts cannot share": (["plan", "--nproc", "4", "--hosts", "3"], 2, "--hosts"),
        "plan: a model whose heads do not divide its width": (["plan", "--nproc", "2", "--n-embd", "10", "--n-head",
                                                               "3"], 2, "--n-embd 10"),
        "trace: RUN_DIR without a trace": (["trace", "summary", empty_dir], 2, "no trace-rank*.json"),
        "bench: flags that conflict": (["bench", "generate", "--block-size", "8"], 2, "--new-tokens"),
        "worker: an endpoint that is not HOST:PORT": (["worker", "--rdzv-endpoint", "::1:29500"], 2,
                                                      "--rdzv-endpoint"),
        # the work failed, exit 1
        "train: a corpus that is empty": (["train", "--data", empty_corpus, *out], 1, "empty"),
        "trace: a trace file that is damaged": (["trace", "summary", bad_trace], 1, "corrupt JSON"),
    }


CASES = ["train: a flag value click refuses", "train: flags that conflict", "train: a layout that does not fit --nproc",
         "train: micro-batches that do not divide the batch", "train: a model whose heads do not divide its width",
         "train: a layout that does not fit the model", "train: an endpoint that is not HOST:PORT",
         "train: --data that names no file",
         "train: --resume of a directory without a checkpoint", "generate: --checkpoint without a model",
         "fill-mask: --checkpoint without a model", "export: RUN_DIR without a checkpoint",
         "quantize: a missing required flag", "quantize: RUN_DIR without a model", "plan: ranks the hosts cannot share",
         "plan: a model whose heads do not divide its width", "trace: RUN_DIR without a trace",
         "bench: flags that conflict", "worker: an endpoint that is not HOST:PORT", "train: a corpus that is empty",
         "trace: a trace file that is damaged"]


@pytest.mark.parametrize("case", CASES)
def test_a_usage_error_exits_2_and_a_failed_run_1_with_one_error_line(tmp_path, case):
    args, status, named = _cases(tmp_path)[case]
    result = run_cli(*args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == status, result.output
    assert len(errors) == 1 and named in errors[0], result.output
    assert "Traceback" not in result.output
    if status == 2:  # click's own usage errors too: no usage block
        assert not any(line.startswith("Usage:") for line in result.output.splitlines()), result.output

"""Every usage error of every ringpipe command, click's own parsing checks included, is one
"Error: ..." line (no usage block) with exit status 2, and names the flags the user typed."""
import pytest

from tests.conftest import TEXT, one_error_line, run_cli


@pytest.mark.parametrize("args,named", [
    (["train", "--steps", "0"], "'--steps': 0 is not in the range"),
    (["train", "--schedule", "bogus"], "'--schedule': 'bogus' is not one of"),
    (["plan", "--tp", "3"], "No such option '--tp'"),
    (["--bogus"], "No such option '--bogus'"),
    (["bogus"], "No such command 'bogus'"),
    (["trace", "summary", "--bogus"], "No such option '--bogus'"),
], ids=["range", "choice", "unknown-option", "group-option", "unknown-command", "sub-group-option"])
def test_a_usage_error_click_finds_is_one_error_line_with_exit_status_2(args, named):
    result = run_cli(*args)
    assert result.exit_code == 2 and named in one_error_line(result), result.output
    assert "Try '" not in result.output and result.output.strip().count("\n") == 0, result.output


@pytest.mark.parametrize("flags,named", [
    (["--n-head", "3", "--n-embd", "96", "--tp", "2", "--nproc", "2"], "--n-head 3 is not divisible by --tp 2"),
    (["--pp", "2", "--virtual-stages", "2", "--n-layer", "2", "--nproc", "2", "--schedule", "interleaved"],
     "2 layers cannot fill --pp 2 × --virtual-stages 2 = 4 pipeline stages"),
], ids=["heads", "virtual-stages"])
def test_a_layout_the_model_cannot_take_names_the_flags(tmp_path, flags, named):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    result = run_cli("train", "--data", corpus, "--out", tmp_path / "run", *flags)
    assert result.exit_code == 2 and named in one_error_line(result), result.output
    assert not (tmp_path / "run").exists()


def test_plan_and_train_offer_the_same_dtypes():
    from ringpipe.cluster.plan_cmd import plan
    from ringpipe.cluster.train_cmd import train

    def choices(command):
        return next(p.type.choices for p in command.params if p.name == "dtype")

    assert list(choices(plan)) == list(choices(train)) and "bf16-mixed" in choices(plan)
    line = one_error_line(run_cli("plan", "--nproc", "2", "--dtype", "bf16-mixed"))
    assert line.startswith("Error: --dtype bf16-mixed:"), line

"""`ringpipe train` refuses a run whose planned memory this host cannot hold, before it tokenizes or
starts anything; a MemoryError that happens anyway is one error line (exit 1) with no advice to
run the same thing again."""
import click
import pytest
from click.testing import CliRunner

from ringpipe.cluster import memory_check
from ringpipe.cluster.cli import Commands
from ringpipe.runtime import RemoteError
from tests.conftest import TEXT, one_error_line, run_cli


@pytest.mark.parametrize("flags,named", [
    (["--block-size", "100000"], "--block-size 100000"),
    (["--n-embd", "65536", "--n-head", "1", "--n-layer", "1"], "--n-embd 65536"),
    (["--block-size", "100000", "--nproc", "2", "--dp", "2"], "2 processes"),
], ids=["block-size", "width", "two-workers"])
def test_train_refuses_a_run_too_big_for_this_hosts_memory(tmp_path, flags, named):
    result = run_cli("train", "--steps", "1", "--out", tmp_path / "run", *flags)
    line = one_error_line(result)
    assert result.exit_code == 2 and named in line and "GiB of memory on this host" in line, result.output
    assert "is available" in line and "--no-memory-check" in line, line
    assert "tokenizing" not in result.output and not (tmp_path / "run").exists()


def test_no_memory_check_lets_a_run_past_the_memory_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 1)  # a host with no memory to spare
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT[:40])  # too small to train on: the run fails later, after tokenizing
    args = ["train", "--data", corpus, "--steps", "1", "--out", tmp_path / "run", "--block-size", "32"]
    assert "GiB of memory" not in one_error_line(run_cli(*args, "--no-memory-check"))
    refused = run_cli(*args)
    assert refused.exit_code == 2 and "of memory on this host" in one_error_line(refused)


def test_available_memory_is_at_most_memavailable():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < memory_check.available_bytes() <= available * 1.1  # (it moves between the two reads)


def _group_raising(exc):
    @click.group(cls=Commands)
    def group():
        pass

    @group.command()
    def work():
        raise exc

    return CliRunner().invoke(group, ["work"])


@pytest.mark.parametrize("exc", [
    MemoryError("Unable to allocate 3.55 TiB for an array with shape (12, 100000, 100000)"),
    RemoteError(1, "_ArrayMemoryError", "_ArrayMemoryError: Unable to allocate 3.55 TiB", "tb", "train_step"),
], ids=["here", "on-a-worker"])
def test_an_out_of_memory_error_is_one_line_with_exit_status_1(exc):
    result = _group_raising(exc)
    line = one_error_line(result)
    assert result.exit_code == 1 and line.startswith("Error: out of memory") and "3.55 TiB" in line, result.output


def test_a_worker_out_of_memory_does_not_advise_starting_the_run_again(tmp_path):
    from ringpipe.cluster.train_cmd import _worker_failure

    exc = RemoteError(0, "_ArrayMemoryError", "_ArrayMemoryError: Unable to allocate", "tb", "spawn")
    message = _worker_failure(exc, str(tmp_path), summary=False).message
    assert "Unable to allocate" in message and "again" not in message and "--resume" not in message


def test_a_worker_out_of_memory_is_not_restarted():
    from ringpipe.cluster.restarts import RestartableFailure, restartable

    exc = RemoteError(0, "_ArrayMemoryError", "_ArrayMemoryError: Unable to allocate", "tb", "train_step")
    assert not isinstance(restartable(exc, click.ClickException("out of memory")), RestartableFailure)

"""What the multi-host test files share, made once per session (tests/conftest.py imports the
fixtures): three namespace hosts with their own sshd, and the losses of one process training
`TRAIN` in float64, which every launcher's run of the same flags must equal."""
import json
import os

import pytest

TRAIN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "8",
         "--microbatches", "2", "--steps", "2", "--lr", "1e-2", "--min-lr", "1e-2", "--warmup", "0",
         "--dtype", "float64", "--eval-every", "0", "--eval-iters", "1"]


def losses(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def hostfile(tmp_path, lines) -> str:
    path = tmp_path / "hosts"
    path.write_text("# namespace hosts\n" + "\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def namespace_hosts():
    """Three namespace hosts with sshd. A test that breaks one puts it back (or makes its own)."""
    from ringpipe.tools.namespace_hosts import NamespaceError, NamespaceHosts

    try:
        with NamespaceHosts(3, sshd=True) as made:
            yield made
    except NamespaceError as exc:
        pytest.skip(f"no namespace hosts here: {exc}")


@pytest.fixture
def ssh_to(namespace_hosts, monkeypatch):
    """`namespace_hosts`, with this test's ssh reaching them (RINGPIPE_SSH)."""
    monkeypatch.setenv("RINGPIPE_SSH", namespace_hosts.ssh_environment["RINGPIPE_SSH"])
    return namespace_hosts


@pytest.fixture(scope="session")
def one_process_losses(tmp_path_factory) -> list:
    """The losses of `ringpipe train` with TRAIN in one process, on conftest's TEXT (made once for
    every test process of the run)."""
    from tests.conftest import TEXT, once_per_run, run_cli  # here: conftest imports this module

    def train(folder):
        corpus = folder / "corpus.txt"
        corpus.write_text(TEXT)
        result = run_cli("train", "--data", corpus, *TRAIN, "--out", folder / "run")
        assert result.exit_code == 0, result.output
        return losses(folder / "run")

    return once_per_run(tmp_path_factory, "one-process", train)[0]

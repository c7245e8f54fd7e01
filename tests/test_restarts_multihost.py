"""`ringpipe train --hostfile ... --max-restarts 1` on network-namespace hosts
(tests/multihost_fixtures.py): a host that goes away (its link down, every process in it SIGKILLed)
is left out of the restart, which goes on on the hosts that remain when they hold the layout, and
says in one line why not when they do not; a worker killed on a host restarts on the same hosts,
bit-identical. Marker `multihost`; about a minute, 11 s of it CPU."""
import os
import random
import secrets
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from safetensors.numpy import load_file

from ringpipe.cluster.restarts import RestartableFailure, run_with_restarts
from ringpipe.model.training.parallel_trainer import Layout
from tests.conftest import processes_tagged, run_cli
from tests.multihost_fixtures import TRAIN, hostfile

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(240)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [*TRAIN, "--steps", "6", "--checkpoint-every", "2", "--dropout", "0.1", "--dp", "2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The weights after RUN with two local workers and no failure."""
    from tests.conftest import TEXT

    folder = tmp_path_factory.mktemp("uninterrupted")
    (folder / "corpus.txt").write_text(TEXT)
    alone = run_cli("train", "--data", folder / "corpus.txt", *RUN, "--nproc", "2", "--out", folder / "run")
    assert alone.exit_code == 0, alone.output
    return load_file(folder / "run" / "model.safetensors")


@pytest.fixture
def hosts_to_lose(monkeypatch):
    """Two namespace hosts of this test's own: it takes one away for good. The restart's ssh to
    the lost host waits out ConnectTimeout: 3 s here (ssh takes an option's first value) rather
    than the hosts' 5, still far above a connection on the bridge."""
    from ringpipe.tools.namespace_hosts import NamespaceError, NamespaceHosts

    try:
        with NamespaceHosts(2, sshd=True) as made:
            ssh = made.ssh_environment["RINGPIPE_SSH"].replace("ssh ", "ssh -o ConnectTimeout=3 ", 1)
            made.ssh_environment = dict(made.ssh_environment, RINGPIPE_SSH=ssh)  # the test passes it on
            monkeypatch.setenv("RINGPIPE_SSH", ssh)
            yield made
    except NamespaceError as exc:
        pytest.skip(f"no namespace hosts here: {exc}")


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    return predicate()


def test_a_worker_killed_on_a_host_restarts_on_the_same_hosts_and_ends_bit_identical(ssh_to, corpus, tmp_path,
                                                                                      uninterrupted):
    machines = ssh_to
    path = hostfile(tmp_path, [f"{machines.addresses[1]} slots=1", f"{machines.addresses[2]} slots=1"])
    out, tag, step = tmp_path / "run", secrets.token_hex(8), random.randint(1, 6)
    environment = dict(os.environ, **machines.ssh_environment, RINGPIPE_FAULT=f"rank=1,step={step},kind=kill",
                       RINGPIPE_TEST_TAG=tag)
    done = subprocess.run([sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus, *RUN, "--out", str(out),
                           "--hostfile", path, "--max-restarts", "1"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    restart = next(line for line in done.stderr.splitlines() if line.startswith("restart 1 of 1"))
    assert "worker rank 1" in restart and f"resuming from step {(step - 1) // 2 * 2}" in restart, restart
    sshd = {process.pid for process in machines.sshd_processes}
    assert _wait_for(lambda: all(set(machines.pids(h)) <= sshd for h in (1, 2)), 15)
    assert _wait_for(lambda: not processes_tagged(tag), 15), processes_tagged(tag)
    # Two ranks sum their gradients in the same order over TCP as through shared memory.
    restarted = load_file(out / "model.safetensors")
    for name in uninterrupted:
        np.testing.assert_array_equal(restarted[name], uninterrupted[name], err_msg=name)


def test_a_host_taken_away_is_left_out_and_the_run_restarts_on_the_remaining_host_to_1e_10(
        hosts_to_lose, corpus, tmp_path, uninterrupted):
    machines = hosts_to_lose
    # Rank 0 on host 0, rank 1 on host 1; host 1 alone has the slots for both.
    path = hostfile(tmp_path, [f"{machines.addresses[0]} slots=1", f"{machines.addresses[1]} slots=2"])
    out = tmp_path / "run"
    tag = secrets.token_hex(8)
    # The injected SIGSTOP only holds rank 0 at the start of step 5 (after step 4's checkpoint) so
    # that the host is taken away at a known point; what the driver sees is the host going silent.
    environment = dict(os.environ, **machines.ssh_environment, RINGPIPE_FAULT="rank=0,step=5,kind=stop",
                       RINGPIPE_TEST_TAG=tag)
    # tests.short_heartbeat: the ringpipe command with a 3 s heartbeat bound, which the driver waits out.
    driver = subprocess.Popen([sys.executable, "-m", "tests.short_heartbeat", "train", "--data", corpus, *RUN,
                               "--out", str(out), "--hostfile", path, "--max-restarts", "1"], cwd=ROOT,
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        committed = out / "checkpoints" / "step-00000004" / "checkpoint.json"
        assert _wait_for(lambda: committed.exists() or driver.poll() is not None, 150), "no checkpoint at step 4"
        assert driver.poll() is None, driver.communicate()
        killed = machines.take_away(0)
        assert killed, "nothing ran on host 0"
        _, stderr = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, stderr
    restart = next(line for line in stderr.splitlines() if line.startswith("restart 1 of 1"))
    assert "worker rank 0" in restart and f"on the remaining hosts {machines.addresses[1]}" in restart, restart
    assert f"host {machines.addresses[0]}: not reachable over ssh" in restart and "resuming from step 4" in restart
    # Nothing is left: not on the remaining host (but its sshd), not here (ssh clients, agents).
    sshd = {process.pid for process in machines.sshd_processes}
    assert _wait_for(lambda: set(machines.pids(1)) <= sshd, 15), machines.pids(1)
    assert _wait_for(lambda: not processes_tagged(tag), 15), processes_tagged(tag)
    restarted = load_file(out / "model.safetensors")
    assert max(float(np.abs(restarted[name] - uninterrupted[name]).max()) for name in uninterrupted) <= 1e-10


def test_hosts_left_that_cannot_hold_the_layout_stop_the_restart_with_one_line_naming_the_lost_host(
        ssh_to, tmp_path):
    machines = ssh_to  # the gateway runs no sshd: to ssh it is a host that went away
    path = hostfile(tmp_path, [f"{machines.addresses[2]} slots=1", f"{machines.gateway} slots=1"])
    attempts = []

    def attempt(restart):
        attempts.append(restart)
        raise RestartableFailure("worker rank 1 went silent", RuntimeError("worker rank 1 went silent"))
    flags = {"max_restarts": 1, "launcher": "ssh", "hostfile": path, "resume": False}
    with pytest.raises(click.ClickException) as raised:
        run_with_restarts(attempt, flags, Layout(dp=2), str(tmp_path), {})
    message = raised.value.message
    assert attempts == [0]  # nothing restarted
    assert message.startswith(f"worker rank 1 went silent; not restarting: the hosts left ({machines.addresses[2]} "
                              "slots=1) cannot hold dp × tp × pp = 2 workers")
    assert f"host {machines.gateway}: not reachable over ssh" in message and "\n" not in message

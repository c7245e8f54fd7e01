"""Manual join in torchrun's words: `ringpipe train --rdzv-endpoint` and `ringpipe worker` on loopback.

The driver and a joining worker are real processes talking CURVE over TCP; other hosts are tested
on network namespaces in tests/test_multihost.py."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ringpipe.runtime.auth import JobKeys, create_key_file
from ringpipe.runtime.rendezvous import Rendezvous, RendezvousError, parse_endpoint
from ringpipe.runtime.rendezvous_agent import join_and_run
from tests.conftest import one_error_line, run_cli

TRAIN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "8",
         "--microbatches", "2", "--steps", "2", "--lr", "1e-2", "--min-lr", "1e-2", "--warmup", "0",
         "--dtype", "float64", "--eval-every", "0", "--eval-iters", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key_file(tmp_path) -> str:
    path = str(tmp_path / "keys" / "rendezvous.key")
    create_key_file(path)
    return path


def losses(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_a_created_key_file_is_readable_by_its_owner_only(key_file):
    assert os.stat(key_file).st_mode & 0o777 == 0o600


def test_a_key_file_other_users_can_read_is_refused_naming_it(key_file):
    os.chmod(key_file, 0o640)
    line = one_error_line(run_cli("worker", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--key-file", key_file))
    assert key_file in line and "0640" in line


def test_a_worker_that_cannot_reach_the_endpoint_fails_within_its_timeout_naming_the_address(key_file):
    endpoint = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    line = one_error_line(run_cli("worker", "--rdzv-endpoint", endpoint, "--key-file", key_file, "--timeout", "1"))
    assert endpoint in line and time.monotonic() - start < 30


@pytest.mark.timeout(60)
def test_a_worker_whose_endpoint_never_answers_a_connection_fails_within_its_timeout(key_file):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never routed, so the connection never forms (a filtered or
    # down host), unlike a refused port; the join must not wait for it forever.
    endpoint = "192.0.2.1:29500"
    start = time.monotonic()
    line = one_error_line(run_cli("worker", "--rdzv-endpoint", endpoint, "--key-file", key_file, "--timeout", "2"))
    assert endpoint in line and time.monotonic() - start < 30


def test_with_nnodes_an_agent_offering_another_nproc_per_node_is_refused(key_file):
    from ringpipe.runtime.auth import read_key_file

    rendezvous = Rendezvous("127.0.0.1", 0, read_key_file(key_file))
    joining = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "worker", "--rdzv-endpoint",
                                rendezvous.endpoint, "--nproc-per-node", "1", "--key-file", key_file],
                               stderr=subprocess.PIPE, text=True)
    def refused():
        if joining.poll() is not None:
            raise ChildProcessError(joining.returncode)

    try:
        with pytest.raises(ChildProcessError):  # the agent ended while the driver still waited
            rendezvous.gather(3, 1, timeout=60.0, slots_each=2, check=refused)
        assert joining.returncode != 0
        assert "--nproc-per-node 2" in joining.stderr.read()
    finally:
        rendezvous.close()
        if joining.poll() is None:
            joining.kill()
        joining.wait()


def test_a_process_without_the_key_cannot_join():
    rendezvous = Rendezvous("127.0.0.1", 0, JobKeys.generate())
    try:
        with pytest.raises(RendezvousError, match=rendezvous.endpoint):
            join_and_run(rendezvous.endpoint, JobKeys.generate(), 1, timeout=1.0)
        assert rendezvous.receive(200) is None  # nothing it sent reached the driver
    finally:
        rendezvous.close()


def test_a_rendezvous_port_in_use_is_one_line_naming_the_address(corpus, tmp_path, key_file):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                      "--rdzv-endpoint", endpoint, "--nnodes", "2", "--key-file", key_file))
    assert endpoint in line and "in use" in line


def test_an_unresolvable_rendezvous_host_is_one_line_naming_it(corpus, tmp_path, key_file):
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                  "--rdzv-endpoint", "no-such-host.invalid:29500", "--key-file", key_file))
    assert "no-such-host.invalid" in line


@pytest.mark.parametrize("flags,flag", [(["--nnodes", "2", "--nproc-per-node", "1"], "--nnodes"),
                                        (["--nnodes", "1", "--nproc-per-node", "8"], "--nnodes"),
                                        (["--nproc", "4"], "--nproc")])
def test_slots_that_do_not_make_dp_tp_pp_are_refused_before_anything_starts(corpus, tmp_path, key_file, flags, flag):
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                  "--tp", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--key-file", key_file,
                                  *flags))
    assert flag in line


@pytest.mark.parametrize("flags,flag", [(["--launcher", "ssh"], "--launcher"), (["--launcher", "join"], "--launcher"),
                                        (["--launcher", "join", "--hostfile", "hosts"], "--hostfile")])
def test_a_launcher_without_what_it_needs_is_refused_naming_the_flag(corpus, tmp_path, flags, flag):
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2", *flags))
    assert line.startswith(f"Error: Invalid value for {flag}")


def test_a_driver_whose_hosts_do_not_come_fails_after_its_timeout_naming_the_endpoint(corpus, tmp_path, key_file):
    endpoint = f"127.0.0.1:{free_port()}"
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                  "--rdzv-endpoint", endpoint, "--nnodes", "2", "--key-file", key_file,
                                  "--rdzv-timeout", "1"))
    # The driver's own worker never had to join: none of the one expected from elsewhere came.
    assert endpoint in line and "only 0 of 1 workers from other hosts joined" in line


@pytest.mark.parametrize("endpoint,expected", [("node07:1234", ("node07", 1234)), ("node07", ("node07", 29500)),
                                               ("[::1]:29501", ("::1", 29501)), ("[fe80::1]", ("fe80::1", 29500)),
                                               ("10.0.0.7:65535", ("10.0.0.7", 65535))])
def test_an_endpoint_is_host_and_port_with_ipv6_addresses_in_brackets(endpoint, expected):
    assert parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint,why", [("node07:0", "1..65535"), ("node07:65536", "1..65535"),
                                          ("node07:http", "1..65535"), ("node07:", "1..65535"), (":29500", "no host"),
                                          ("::1:29500", "brackets"), ("[::1", "brackets"), ("[::1]29500", "brackets")])
def test_a_malformed_endpoint_is_refused_naming_it_and_what_is_wrong(endpoint, why):
    with pytest.raises(RendezvousError, match=why) as error:
        parse_endpoint(endpoint)
    assert repr(endpoint) in str(error.value)


def test_a_worker_given_a_port_out_of_range_fails_naming_the_endpoint(key_file):
    line = one_error_line(run_cli("worker", "--rdzv-endpoint", "127.0.0.1:70000", "--key-file", key_file))
    assert "'127.0.0.1:70000'" in line and "1..65535" in line


@pytest.mark.timeout(120)
def test_a_run_joined_over_ipv6_at_a_bracketed_endpoint_trains(corpus, tmp_path, key_file):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    endpoint = f"[::1]:{free_port()}"
    agent = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "worker", "--rdzv-endpoint", endpoint,
                              "--key-file", key_file], stderr=subprocess.PIPE)
    try:
        joined = run_cli("train", "--data", corpus, *TRAIN, "--steps", "1", "--out", tmp_path / "run", "--dp", "2",
                         "--rdzv-endpoint", endpoint, "--nnodes", "2", "--nproc-per-node", "1", "--key-file", key_file)
        assert joined.exit_code == 0, joined.output
        assert agent.wait(timeout=30) == 0, agent.stderr.read().decode()
    finally:
        agent.kill()
        agent.wait()
    assert f"waiting at {endpoint}" in joined.output and len(losses(tmp_path / "run")) == 1


@pytest.mark.timeout(120)
def test_a_run_joined_by_a_worker_on_another_host_trains_as_one_process_does(corpus, tmp_path, key_file):
    endpoint = f"127.0.0.1:{free_port()}"
    agent = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "worker", "--rdzv-endpoint", endpoint,
                              "--nproc-per-node", "1", "--key-file", key_file], stderr=subprocess.PIPE)
    try:
        joined = run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "joined", "--dp", "2",
                         "--rdzv-endpoint", endpoint, "--nnodes", "2", "--nproc-per-node", "1", "--key-file", key_file)
        assert joined.exit_code == 0, joined.output
        assert agent.wait(timeout=30) == 0  # the joined host's agent ends with the run
    finally:
        agent.kill()
        agent.wait()
    assert "placement:" in joined.output
    alone = run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "alone")
    assert alone.exit_code == 0, alone.output
    assert losses(tmp_path / "joined") == pytest.approx(losses(tmp_path / "alone"), rel=1e-12)


def _children(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in done.stdout.split()]


@pytest.mark.timeout(120)
def test_a_driver_that_dies_leaves_no_worker_running_on_the_joined_host(corpus, tmp_path, key_file):
    from tests.conftest import process_alive

    endpoint = f"127.0.0.1:{free_port()}"
    agent = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "worker", "--rdzv-endpoint", endpoint,
                              "--key-file", key_file, "--driver-silence", "2"], stderr=subprocess.DEVNULL)
    driver = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus, *TRAIN,
                               "--steps", "100000", "--out", str(tmp_path / "run"),
                               "--rdzv-endpoint", endpoint, "--nproc-per-node", "0", "--key-file", key_file],
                              stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(agent.pid)
        assert len(workers) == 1 and driver.poll() is None
        driver.kill()  # no goodbye: the agent hears nothing more
        assert agent.wait(timeout=30) != 0
        assert not any(process_alive(pid) for pid in workers)
    finally:
        for process in (driver, agent):
            if process.poll() is None:
                process.kill()
            process.wait()


def test_messages_about_a_remote_worker_name_its_host_and_say_when_its_agent_fell_silent_too():
    from ringpipe.runtime.rendezvous import AGENT_LOST_S, Agent, RendezvousLauncher

    rendezvous = Rendezvous("127.0.0.1", 0, JobKeys.generate())
    agent = Agent(b"a1", "node07", "10.0.0.7", 1)
    launcher = RendezvousLauncher(rendezvous, [agent], hosts=[0])
    try:
        assert launcher.host(0) == "node07" and launcher.process_note(0) == ""
        agent.last_heard -= AGENT_LOST_S + 1  # its status reports stopped coming
        assert launcher.process_note(0).endswith("the host or its link is down)")
    finally:
        launcher.close()


def test_an_agent_watching_its_still_open_stdin_exits_without_an_interpreter_abort():
    # srun and ssh agents watch stdin from a daemon thread; the process must still end cleanly.
    code = "import time\nfrom ringpipe.cluster.launchers import stdin_watch\nstdin_watch()\ntime.sleep(0.2)\n"
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 0, stderr
        assert "Fatal Python error" not in stderr
    finally:
        process.stdin.close()
        if process.poll() is None:
            process.kill()
            process.wait()

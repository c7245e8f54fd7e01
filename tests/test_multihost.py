"""`ringpipe train --hostfile` on real machinery: network-namespace hosts joined by a bridge, each
with its own address and its own sshd (key authentication only). Marker `multihost`; about 30 s.

The workers of different hosts talk over the veth links (their counters prove it), with CURVE;
a process without the job's key, on another host, gets nothing from them."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ringpipe.cluster.ssh_launch import check_host, hostfile_launcher
from ringpipe.runtime import Cluster
from tests.conftest import one_error_line, run_cli
from tests.multihost_fixtures import TRAIN, hostfile, losses

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(180)]

@pytest.mark.parametrize("layout", [["--dp", "2", "--tp", "2"], ["--tp", "2", "--pp", "2"]])
def test_training_over_a_hostfile_equals_one_process_and_crosses_the_hosts_links(ssh_to, corpus, tmp_path, layout,
                                                                               one_process_losses):
    hosts = ssh_to
    path = hostfile(tmp_path, [f"{hosts.addresses[0]} slots=2", f"{hosts.addresses[1]} slots=2"])
    before = [hosts.veth_bytes(i) for i in range(2)]
    spread = run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "spread", *layout, "--hostfile", path)
    assert spread.exit_code == 0, spread.output
    crossed = [hosts.veth_bytes(i) - b for i, b in enumerate(before)]
    # Data-parallel gradients or pipeline activations, and the driver's control traffic, crossed
    # both links; the tensor-parallel groups stayed inside their host.
    assert min(crossed) > 50_000, crossed
    assert f"{hosts.addresses[0]}: ranks 0-1" in spread.output and "all inside one host" in spread.output
    assert losses(tmp_path / "spread") == pytest.approx(one_process_losses, rel=1e-12)


def test_a_host_ssh_cannot_reach_is_one_line_naming_it_and_nothing_starts(ssh_to, corpus, tmp_path):
    hosts = ssh_to
    path = hostfile(tmp_path, [f"{hosts.addresses[0]} slots=1", f"{hosts.gateway} slots=1"])  # no sshd there
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                  "--hostfile", path))
    assert f"host {hosts.gateway}: not reachable over ssh" in line


def test_too_few_slots_in_the_hostfile_is_one_line(ssh_to, corpus, tmp_path):
    path = hostfile(tmp_path, [f"{ssh_to.addresses[0]} slots=1"])
    line = one_error_line(run_cli("train", "--data", corpus, *TRAIN, "--out", tmp_path / "run", "--dp", "2",
                                  "--hostfile", path))
    assert "1 slots on 1 hosts" in line and "2 workers" in line


def test_a_run_directory_a_host_cannot_see_is_named_with_the_host(ssh_to, tmp_path):
    problem = check_host(ssh_to.addresses[1], str(tmp_path / "not-shared" / "probe"), "token")
    assert problem.startswith(f"host {ssh_to.addresses[1]}: the run directory") and "not visible" in problem


def _package_folders() -> set:
    """Every folder `import ringpipe` can come from here: this test's, and an installed one."""
    import ringpipe.runtime

    folders = {os.path.realpath(os.path.dirname(os.path.dirname(ringpipe.runtime.__file__)))}
    where = "import os, ringpipe.runtime as r; print(os.path.realpath(os.path.dirname(os.path.dirname(r.__file__))))"
    done = subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, cwd="/",
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return folders | ({done.stdout.strip()} if done.returncode == 0 else set())


def _other_version(tmp_path) -> str:
    """A runtime/version.py that says 999.0."""
    changed = tmp_path / "version.py"
    changed.write_text('__version__ = "999.0"\n')
    return str(changed)


@pytest.fixture(scope="module")
def odd_hosts(tmp_path_factory):
    """Host 0 without ringpipe (its runtime folder is empty there), host 1 with ringpipe 999.0."""
    from ringpipe.tools.namespace_hosts import NamespaceError, NamespaceHosts

    tmp_path = tmp_path_factory.mktemp("odd-hosts")
    empty = tmp_path / "empty"
    empty.mkdir()
    folders, other = _package_folders(), _other_version(tmp_path)
    hidden = [(str(empty), os.path.join(folder, "runtime")) for folder in folders]
    changed = [(other, path) for path in (os.path.join(folder, "runtime", "version.py") for folder in folders)
               if os.path.exists(path)]  # a bind mount needs its target; an older install may lack it
    try:
        with NamespaceHosts(2, sshd=True, mounts={0: hidden, 1: changed}) as made:
            yield made
    except NamespaceError as exc:
        pytest.skip(f"no namespace hosts here: {exc}")


@pytest.fixture
def probe(tmp_path) -> tuple[str, str]:
    path = tmp_path / "probe"
    path.write_text("token")
    return str(path), "token"


def test_a_host_where_ringpipe_is_not_importable_is_named(odd_hosts, monkeypatch, probe):
    monkeypatch.setenv("RINGPIPE_SSH", odd_hosts.ssh_environment["RINGPIPE_SSH"])
    problem = check_host(odd_hosts.addresses[0], *probe)
    assert problem.startswith(f"host {odd_hosts.addresses[0]}: ringpipe is not importable"), problem


def test_a_host_running_another_ringpipe_version_is_named_with_both_versions(odd_hosts, monkeypatch, probe):
    from ringpipe.runtime.rendezvous import package_version

    monkeypatch.setenv("RINGPIPE_SSH", odd_hosts.ssh_environment["RINGPIPE_SSH"])
    problem = check_host(odd_hosts.addresses[1], *probe)
    assert problem == f"host {odd_hosts.addresses[1]}: runs ringpipe 999.0, this driver {package_version()}"


STRANGER = textwrap.dedent("""
    import sys, time, zmq
    from zmq.utils.monitor import recv_monitor_message
    context = zmq.Context()
    server = sys.argv[1].encode()  # the job's public key, as if it had leaked
    for address in sys.argv[2:]:
        sock = context.socket(zmq.DEALER)
        public, secret = zmq.curve_keypair()  # a key pair of its own, not the job's
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.ROUTING_ID, b"w0")
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket()
        sock.connect(address)
        try:  # (a refused handshake may drop the pipe first: then a DEALER's send would block for good)
            sock.send_multipart([b"\\x81\\xa1t\\xa8register"], zmq.NOBLOCK)
        except zmq.Again:
            pass
        verdict, deadline = "no handshake", time.monotonic() + 10
        while verdict == "no handshake" and monitor.poll(max(1, int(1000 * (deadline - time.monotonic())))):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                verdict = "admitted"
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                verdict = "refused"
        print(verdict, "heard" if sock.poll(200) else "nothing")
""")



def _host_and_sum(comm, value):
    import os

    return os.environ["GROUP_RANK"], float(comm.all_reduce(np.array([value], dtype=np.float64))[0])


def test_a_process_on_another_host_without_the_job_secret_is_refused_and_changes_nothing(ssh_to, tmp_path):
    hosts = ssh_to
    path = hostfile(tmp_path, [f"{hosts.addresses[0]} slots=1", f"{hosts.addresses[1]} slots=1"])
    options = hostfile_launcher(path, 2, 1, str(tmp_path / "run"), 60.0, lambda message: None)
    with Cluster(2, **options) as cluster:
        assert [entry["host"] for entry in cluster.worker_addresses] == hosts.addresses[:2]
        # Each socket listens on its own host's address on the link, none on every interface.
        assert cluster.address.startswith(f"tcp://{hosts.gateway}:")
        assert [entry["data"].rsplit(":", 1)[0] for entry in cluster.worker_addresses] == \
            [f"tcp://{address}" for address in hosts.addresses[:2]]
        targets = [cluster.address, *(entry["data"] for entry in cluster.worker_addresses)]
        stranger = hosts.run_in(2, [sys.executable, "-c", STRANGER, cluster.keys.public.decode(), *targets],
                                capture_output=True, text=True, timeout=60)
        # Even knowing the job's public key, each connection (it crossed the links) fails CURVE's
        # client authentication: nothing it sends is read, nothing reaches it.
        assert stranger.stdout.split("\n")[:3] == ["refused nothing"] * 3, (stranger.stdout, stranger.stderr)
        assert cluster.run(_host_and_sum, 1.5) == [["0", 3.0], ["1", 3.0]]

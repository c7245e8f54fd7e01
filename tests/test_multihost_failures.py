"""Failures across namespace hosts (marker multihost; about 60 s): a host whose link goes down stops
the job within the heartbeat bound, with a report naming the host; a killed driver leaves nothing
running on any host. Processes left on a host are read from its namespace (`ip netns pids`)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ringpipe.cluster.ssh_launch import hostfile_launcher
from ringpipe.runtime import Cluster, WorkerUnresponsive
from tests.conftest import process_alive, tagged_processes_left
from tests.multihost_fixtures import TRAIN, hostfile

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(180)]


def left_on(hosts, index) -> list[int]:
    """What still runs in host `index`'s namespace, but for its sshd listener."""
    done = subprocess.run(["ip", "netns", "pids", hosts.namespaces[index]], capture_output=True, text=True)
    sshd = {process.pid for process in hosts.sshd_processes}
    return [int(pid) for pid in done.stdout.split() if int(pid) not in sshd and process_alive(int(pid))]


def wait_until_empty(hosts, indices, seconds) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [pid for index in indices for pid in left_on(hosts, index)]
        if not left:
            return []
        time.sleep(0.1)
    return left


def reduce_for_a_while(comm, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        comm.all_reduce(np.ones(8))


def test_a_host_whose_link_goes_down_stops_the_job_with_a_report_naming_it(ssh_to, tmp_path):
    hosts = ssh_to
    path = hostfile(tmp_path, [f"{hosts.addresses[0]} slots=1", f"{hosts.addresses[1]} slots=1"])
    options = hostfile_launcher(path, 2, 1, str(tmp_path / "run"), 60.0, lambda message: None)
    # A heartbeat bound of 4 s rather than 8: the test waits it out.
    cluster = Cluster(2, log_dir=str(tmp_path / "run" / "logs"), timeout=30, heartbeat_timeout=4.0, **options)
    try:
        future = cluster.submit(reduce_for_a_while, 120)
        time.sleep(1.0)
        subprocess.run(["ip", "link", "set", hosts.veths[1], "down"], check=True)
        cut = time.monotonic()
        with pytest.raises(WorkerUnresponsive) as info:
            future.result(timeout=60)
        elapsed = time.monotonic() - cut
        cluster.close()
        stopped = time.monotonic() - cut
    finally:
        subprocess.run(["ip", "link", "set", hosts.veths[1], "up"], check=True)
        cluster.close()
    assert elapsed < 11.0, elapsed  # 4 s of silence, then the report; generous for a loaded machine
    assert stopped < elapsed + 5.0, stopped  # the unreachable host is not waited for
    assert f"worker rank 1 (pid {cluster.pids[1]}) on host {hosts.addresses[1]} sent no heartbeat" in str(info.value)
    report = info.value.report
    assert (report.root.rank, report.root.host) == (1, hosts.addresses[1])
    assert report.root.what.endswith("the host or its link is down)"), report.text()
    assert [(c.rank, c.host) for c in report.consequences] == [(0, hosts.addresses[0])]
    assert report.consequences[0].what.startswith("stopped by the driver"), report.text()
    # Its log was written on its host, into the run directory every host sees.
    assert report.root.log_path == str(tmp_path / "run" / "logs" / "rank-1.log")
    assert report.root.log.startswith(f"--- ringpipe worker rank 1 on host {hosts.addresses[1]}, started ")
    # Host 1 heard nothing more from the driver: its agent stops its worker once the link is back
    # (the ssh session ended) or after its silence bound, whichever comes first.
    assert wait_until_empty(hosts, [0, 1], 30) == []


def test_a_killed_driver_leaves_nothing_running_on_the_ssh_hosts(ssh_to, corpus, tmp_path):
    hosts = ssh_to
    path = hostfile(tmp_path, [f"{hosts.addresses[0]} slots=1", f"{hosts.addresses[1]} slots=1"])
    out = tmp_path / "run"
    flags = [*TRAIN, "--steps", "100000", "--checkpoint-every", "0"]
    tag = f"ssh-{os.getpid()}-{time.monotonic_ns()}"
    driver = subprocess.Popen([sys.executable, "-m", "ringpipe.cluster", "train", "--data", corpus, *flags,
                               "--out", str(out), "--dp", "2", "--hostfile", path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, RINGPIPE_TEST_TAG=tag))
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert driver.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        assert all(len(left_on(hosts, index)) >= 2 for index in range(2))  # an agent and a worker on each
        driver.send_signal(signal.SIGKILL)  # no goodbye: its ssh connections' input just ends
        driver.wait()
        # Well within the agents' 15 s silence bound: they saw their input end.
        assert wait_until_empty(hosts, [0, 1], 10) == []
        assert tagged_processes_left(tag, 5) == []  # and the ssh clients here end with them
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

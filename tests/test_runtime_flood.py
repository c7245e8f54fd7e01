"""Strangers without the job key cannot end a run by opening connections: each listening socket
drops a connection that has not finished its handshake within a short deadline, and every process
raises its soft descriptor limit, so a flood of idle TCP connections leaves files writable."""
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ringpipe.runtime.auth import HANDSHAKE_DEADLINE_MS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listening_addresses(cluster_info):
    """(host, port) of the driver's control socket and of every worker's data socket."""
    out = []
    for address in cluster_info:
        host, port = address[len("tcp://"):].rsplit(":", 1)
        out.append((host, int(port)))
    return out


def _open_idle_connections(addresses, count, timeout=10.0, batch=50, total_timeout=20.0):
    """`count` raw TCP connections to each address that never send a byte (no ZMTP handshake);
    returns those established. Opened `batch` per address at a time, each round connected (or
    given up after `timeout`) before the next, so no server's accept queue overflows; the
    addresses (separate processes) accept their rounds side by side. A server that stops accepting
    (out of descriptors) ends the flood after `total_timeout`."""
    connected = []
    give_up = time.monotonic() + total_timeout
    selector = selectors.DefaultSelector()  # epoll: descriptors above 1024 are fine
    for first in range(0, count, batch):
        if time.monotonic() > give_up:
            break
        waiting = set()
        for host, port in addresses:
            for _ in range(min(batch, count - first)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex((host, port))
                selector.register(sock, selectors.EVENT_WRITE)
                waiting.add(sock)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(0.2):
                sock = key.fileobj
                selector.unregister(sock)
                waiting.discard(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.append(sock)
                else:
                    sock.close()
        for sock in waiting:
            selector.unregister(sock)
            sock.close()
    selector.close()
    return connected


def _wait_until_dropped(socks, timeout):
    """Seconds until the server closed every connection (EOF or reset); raises if some stay open."""
    start = time.monotonic()
    selector = selectors.DefaultSelector()  # epoll: descriptors above 1024 are fine
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    open_ = set(socks)
    while open_ and time.monotonic() - start < timeout:
        for key, _ in selector.select(0.2):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # the server's greeting, then EOF when it gives up on us
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                open_.discard(sock)
    selector.close()
    for sock in socks:
        sock.close()
    assert not open_, f"{len(open_)} of {len(socks)} idle connections still open after {timeout}s"
    return time.monotonic() - start


def sum_of_ranks(comm):
    x = np.array([float(comm.rank)])
    comm.all_reduce(x)
    return float(x[0])


def test_idle_connections_are_dropped_after_the_handshake_deadline_on_every_listening_port(local_cluster):
    cluster = local_cluster(2)
    addresses = _listening_addresses([cluster.address] + [a["data"] for a in cluster.worker_addresses])
    assert len(addresses) == 3
    socks = _open_idle_connections(addresses, 20)
    elapsed = _wait_until_dropped(socks, HANDSHAKE_DEADLINE_MS / 1000 + 5.0)
    assert elapsed < HANDSHAKE_DEADLINE_MS / 1000 + 5.0
    assert cluster.run(sum_of_ranks) == [1.0, 1.0]  # the job's own connections were not touched


DRIVER = textwrap.dedent("""
    import json, os, resource, sys
    sys.path.insert(0, {root!r})
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # as `ulimit -n` leaves it
    from ringpipe.runtime import Cluster
    from tests.test_runtime_flood import sum_of_ranks

    with Cluster(2) as cluster:
        print(json.dumps({{"addresses": [cluster.address] + [a["data"] for a in cluster.worker_addresses],
                          "pids": [os.getpid()] + cluster.pids,
                          "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}}), flush=True)
        sys.stdin.readline()  # the stranger's connections are open now
        results = cluster.run(sum_of_ranks, timeout=60)
        files = [open(os.path.join(sys.argv[3], f"file-{{i}}.bin"), "wb") for i in range(200)]
        for f in files:
            f.write(b"x" * 1000)
            f.close()
        print(json.dumps({{"results": results}}), flush=True)
        sys.stdin.readline()  # the test has looked at our descriptors
""")


def _descriptors(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        raise AssertionError(f"process {pid} of the job ended during the flood") from None


def _soft_descriptor_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


def _wait_for_descriptors_back(pids, baseline, timeout):
    """Wait until every process holds about as many descriptors as before the flood."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = {pid: _descriptors(pid) for pid in pids}
        if all(now[pid] <= baseline[pid] + 20 for pid in pids):
            return
        time.sleep(0.2)
    raise AssertionError(f"descriptors {now} still above {baseline} after {timeout}s")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hard_too", [False, True], ids=["soft-limit-1024", "soft-and-hard-limit-1024"])
def test_a_flood_of_idle_connections_does_not_end_a_run(tmp_path, hard_too):
    """1,100 idle connections to every listening port of a job whose descriptor limit is 1024.
    With only the soft limit low, the job raises it and works through the flood; with the hard
    limit low too, the connections are dropped after the handshake deadline and the job goes on.
    The stranger keeps its sockets open all along (an idle attacker never closes)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 3 * 1100 + 200:
        pytest.skip(f"this test process may open only {hard} descriptors")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT))
    out = tmp_path / "files"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), "1024", "1024" if hard_too else str(hard), str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    socks = []
    try:
        info = json.loads(proc.stdout.readline())
        baseline = {pid: _descriptors(pid) for pid in info["pids"]}
        socks = _open_idle_connections(_listening_addresses(info["addresses"]), 1100, timeout=1.0)
        drop_deadline = 3 * HANDSHAKE_DEADLINE_MS / 1000 + 8.0  # accepting those queued takes rounds
        if hard_too:  # out of descriptors for now: they must come back without the stranger's help
            _wait_for_descriptors_back(info["pids"], baseline, drop_deadline)
        else:  # every process of the job (the workers too) raised its soft limit to the hard one
            expected = hard if hard != resource.RLIM_INFINITY and hard <= 1 << 20 else 1 << 20
            assert all(_soft_descriptor_limit(pid) == expected for pid in info["pids"])
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not hard_too:
            _wait_for_descriptors_back(info["pids"], baseline, drop_deadline)
        _, stderr = proc.communicate("done\n", timeout=30)
        assert line, stderr
        assert json.loads(line)["results"] == [1.0, 1.0]
        assert len(os.listdir(out)) == 200
        assert proc.returncode == 0, stderr
    finally:
        for sock in socks:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

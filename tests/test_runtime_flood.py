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

from runtime.auth import HANDSHAKE_DEADLINE_MS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _listening_addresses(cluster_info):
    """(host, port) of the driver's control socket and of every worker's data socket."""
    out = []
    for address in cluster_info:
        host, port = address[len("tcp://"):].rsplit(":", 1)
        out.append((host, int(port)))
    return out


def _open_idle_connections(addresses, count):
    """`count` raw TCP connections to each address that never send a byte (no ZMTP handshake)."""
    socks = []
    for host, port in addresses:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5.0)  # one at a time, as a client does: each is accepted before the next
            try:
                sock.connect((host, port))
            except OSError:  # the server is out of descriptors and its queue is full: try the next
                sock.close()
                continue
            sock.setblocking(False)
            socks.append(sock)
    return socks


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
    from runtime import Cluster
    from tests.test_runtime_flood import sum_of_ranks

    with Cluster(2) as cluster:
        print(json.dumps({{"addresses": [cluster.address] + [a["data"] for a in cluster.worker_addresses],
                          "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}}), flush=True)
        sys.stdin.readline()  # the stranger's connections are open (or have been dropped) now
        results = cluster.run(sum_of_ranks, timeout=60)
        files = [open(os.path.join(sys.argv[3], f"file-{{i}}.bin"), "wb") for i in range(200)]
        for f in files:
            f.write(b"x" * 1000)
            f.close()
        print(json.dumps({{"results": results}}), flush=True)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hard_too", [False, True], ids=["soft-limit-1024", "soft-and-hard-limit-1024"])
def test_a_flood_of_idle_connections_does_not_end_a_run(tmp_path, hard_too):
    """1,100 idle connections to every listening port of a job whose descriptor limit is 1024.
    With only the soft limit low, the job raises it and works through the flood; with the hard
    limit low too, the flood is dropped after the handshake deadline and the job goes on."""
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
    try:
        info = json.loads(proc.stdout.readline())
        socks = _open_idle_connections(_listening_addresses(info["addresses"]), 1100)
        if hard_too:
            # Descriptors run out for now; the stranger's connections must go within the deadline
            # (plus the time to accept the ones queued behind them).
            _wait_until_dropped(socks, 3 * HANDSHAKE_DEADLINE_MS / 1000 + 10.0)
        else:
            time.sleep(1.0)  # every connection accepted and idle while the job works
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not hard_too:
            _wait_until_dropped(socks, 3 * HANDSHAKE_DEADLINE_MS / 1000 + 10.0)
        _, stderr = proc.communicate(timeout=30)
        assert line, stderr
        assert json.loads(line)["results"] == [1.0, 1.0]
        assert len(os.listdir(out)) == 200
        assert proc.returncode == 0, stderr
        if not hard_too:
            assert info["soft"] > 1024  # the job raised its soft limit to the hard one
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

"""Hosts for tests and benchmarks on one machine: network namespaces joined by a bridge, each with
its own address and, optionally, its own sshd (Debian's openssh-server, key authentication only).

    with NamespaceHosts(2, sshd=True) as hosts:
        hosts.addresses          # ["198.18.N.1", "198.18.N.2"]; the bridge (this namespace) is .254
        hosts.ssh_environment    # {"RINGPIPE_SSH": "ssh -i KEY ..."} for `ringpipe train --hostfile`
        hosts.veth_bytes(0)      # bytes through host 0's link (both directions), from its counters
        hosts.take_away(0)       # link down, then SIGKILL every process in host 0's namespace

`mounts={1: [(source, target)]}` bind-mounts `source` over `target` for what runs through host 1's
sshd only (a mount namespace of its own): a host whose files differ, on one machine.

Addresses come from 198.18.0.0/15 (set aside for benchmarks, RFC 2544), one /24 per creating
process and instance, so two at once do not collide; traffic goes only to those addresses. Needs root
(CAP_NET_ADMIN); everything made is removed on exit, whatever happened.
"""
from __future__ import annotations

import itertools
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SSHD = "/usr/sbin/sshd"
_made = itertools.count()


class NamespaceError(RuntimeError):
    """Namespaces, the bridge or sshd could not be set up here (the reason is the message)."""


def _ip(*args, namespace: str | None = None):
    command = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise NamespaceError(f"{' '.join(command)}: {done.stderr.strip()}")


class NamespaceHosts:
    """`count` namespace hosts; see the module docstring. `rate` ("1gbit", "200mbit"): shape both
    directions of every host's link with `tc tbf`."""

    def __init__(self, count: int, sshd: bool = False, rate: str | None = None, mounts: dict | None = None):
        self.count, self.with_sshd, self.rate, self.mounts = count, sshd, rate, mounts or {}
        # Unique per process and per instance: interface names (at most 15 characters) and a /24.
        made = next(_made)
        tag = f"{os.getpid() % 100000}{chr(ord('a') + made % 26)}"
        network = (os.getpid() * 8 + made) % 500
        self.subnet = f"198.{18 + network // 250}.{network % 250 + 1}"
        self.bridge = f"rpb{tag}"
        self.namespaces = [f"rpn{tag}h{i}" for i in range(count)]
        self.veths = [f"rpv{tag}h{i}" for i in range(count)]
        self.addresses = [f"{self.subnet}.{i + 1}" for i in range(count)]
        self.gateway = f"{self.subnet}.254"
        self.directory = None
        self.sshd_processes: list[subprocess.Popen] = []
        self.ssh_environment: dict = {}

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _create(self):
        if os.geteuid() != 0:
            raise NamespaceError("network namespaces need root")
        if shutil.which("ip") is None:
            raise NamespaceError("the ip command (iproute2) is missing")
        self.directory = tempfile.mkdtemp(prefix="ringpipe-hosts-")
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for namespace, veth, address in zip(self.namespaces, self.veths, self.addresses):
            _ip("netns", "add", namespace)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=namespace)
            _ip("link", "set", "eth0", "up", namespace=namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
            if self.rate:
                self._shape(namespace, veth)
        if self.with_sshd:
            self._start_sshd()

    def _shape(self, namespace, veth):
        """tbf on both ends of the link: the root end shapes what reaches the host, the host's
        end what it sends."""
        for prefix, device in ((["ip", "netns", "exec", namespace], "eth0"), ([], veth)):
            command = [*prefix, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", self.rate,
                       "burst", "256kb", "latency", "50ms"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise NamespaceError(f"{' '.join(command)}: {done.stderr.strip()}")

    def _start_sshd(self):
        if not os.path.exists(SSHD):
            raise NamespaceError(f"{SSHD} is missing (Debian's openssh-server; .ci/install_multihost.sh)")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        client_key = os.path.join(self.directory, "client_key")
        host_key = os.path.join(self.directory, "host_key")
        for path in (client_key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True,
                           capture_output=True)
        shutil.copy(client_key + ".pub", os.path.join(self.directory, "authorized_keys"))
        for host, (namespace, address) in enumerate(zip(self.namespaces, self.addresses)):
            config = os.path.join(self.directory, f"sshd_{address}.conf")
            with open(config, "w") as f:
                f.write(f"ListenAddress {address}\nPort 22\nHostKey {host_key}\n"
                        f"AuthorizedKeysFile {self.directory}/authorized_keys\nPidFile none\n"
                        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n")
            command = [SSHD, "-D", "-e", "-f", config]
            if self.mounts.get(host):
                binds = "".join(f"mount --bind {shlex.quote(source)} {shlex.quote(target)} && "
                                for source, target in self.mounts[host])
                command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           binds + "exec " + shlex.join(command)]
            self.sshd_processes.append(subprocess.Popen(["ip", "netns", "exec", namespace, *command],
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # ssh takes the first value of an option: 5 s to connect on one bridge is generous even on a
        # loaded machine, and a host taken away is given up on that much sooner than the default 10 s.
        self.ssh_environment = {"RINGPIPE_SSH": f"ssh -F /dev/null -i {client_key} -o StrictHostKeyChecking=no "
                                                f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5"}
        deadline = time.monotonic() + 10
        for address, process in zip(self.addresses, self.sshd_processes):
            while True:
                if process.poll() is not None:
                    raise NamespaceError(f"sshd for {address} exited with code {process.returncode}")
                try:
                    socket.create_connection((address, 22), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise NamespaceError(f"sshd for {address} did not listen within 10 s") from None
                    time.sleep(0.05)

    def veth_bytes(self, host: int) -> int:
        """Bytes that crossed host `host`'s link so far, both directions."""
        total = 0
        for direction in ("rx_bytes", "tx_bytes"):
            with open(f"/sys/class/net/{self.veths[host]}/statistics/{direction}") as f:
                total += int(f.read())
        return total

    def run_in(self, host: int, command: list[str], **options) -> subprocess.CompletedProcess:
        """Run `command` inside host `host`'s namespace."""
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host], *command], **options)

    def take_away(self, host: int) -> list[int]:
        """Host `host` goes away as a machine does: its link goes down, then every process in its
        namespace (sshd, agents, workers) is SIGKILLed. Returns the killed pids."""
        _ip("link", "set", self.veths[host], "down")
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def pids(self, host: int) -> list[int]:
        """The processes running in host `host`'s namespace."""
        listed = subprocess.run(["ip", "netns", "pids", self.namespaces[host]], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def close(self):
        for process in self.sshd_processes:
            process.terminate()
        for process in self.sshd_processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace in self.namespaces:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for veth in self.veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

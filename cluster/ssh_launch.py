"""`ringpipe train --hostfile FILE`: check every host over ssh, then start an agent on each.

The ssh command is `ssh` with BatchMode (never a password prompt), or `$RINGPIPE_SSH` (split like a
shell would, e.g. "ssh -i KEY -p 2222"). Each host gets the driver's Python and import path (the
run is expected on a filesystem every host sees, as Megatron and DeepSpeed expect), and the fresh
rendezvous key on the ssh command's stdin: never in a command line or an environment.
"""
from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from ringpipe.cluster.hostfile import HostfileError, hostfile_slots
from ringpipe.runtime.auth import JobKeys
from ringpipe.runtime.launch import reaching_this_package, stop_processes
from ringpipe.runtime.rendezvous import (Rendezvous, RendezvousError, RendezvousLauncher, outward_address,
                                         package_version, resolve_host)

CHECK_TIMEOUT_S = 30.0
PROBE_PREFIX = ".ringpipe-probe-"


def ssh_command(host: str) -> list[str]:
    return [*shlex.split(os.environ.get("RINGPIPE_SSH", "ssh")), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            host]


def remote_python(arguments: list[str]) -> str:
    """A shell command line running this interpreter with this package on its import path."""
    path = reaching_this_package({"PYTHONPATH": os.environ.get("PYTHONPATH", "")}).get("PYTHONPATH", "")
    return (f"cd {shlex.quote(os.getcwd())} 2>/dev/null; exec env PYTHONPATH={shlex.quote(path)} "
            f"{shlex.quote(sys.executable)} " + " ".join(shlex.quote(a) for a in arguments))


def check_host(host: str, probe_path: str, token: str) -> str:
    """"" if `host` is fit to run workers; else one line naming it and what is wrong."""
    script = ("import sys\nfrom ringpipe.runtime.rendezvous import package_version\nprint(package_version())\n"
              "try:\n    print(open(sys.argv[1]).read())\nexcept OSError:\n    print('-')\n")
    try:
        done = subprocess.run([*ssh_command(host), remote_python(["-c", script, probe_path])], capture_output=True,
                              text=True, timeout=CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"host {host}: no answer over ssh within {CHECK_TIMEOUT_S:g}s"
    except OSError as exc:
        return f"host {host}: cannot run ssh ({exc.strerror})"
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    if done.returncode == 255:
        return f"host {host}: not reachable over ssh ({last})"
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) < 2:
        return f"host {host}: ringpipe is not importable by {sys.executable} there ({last})"
    if lines[0] != package_version():
        return f"host {host}: runs ringpipe {lines[0]}, this driver {package_version()}"
    if lines[1] != token:
        return (f"host {host}: the run directory {os.path.dirname(probe_path)} is not visible there (a probe file "
                "written here was not found); it must be on a filesystem every host sees")
    return ""


def check_hosts(hosts: list[str], out: str) -> None:
    """Check every host at once (ssh, ringpipe, version, the run directory); RendezvousError naming
    the first host that failed."""
    failed = [problem for problem in host_problems(hosts, out) if problem]
    if failed:
        raise RendezvousError(failed[0] + (f" (and {len(failed) - 1} more hosts failed)" if len(failed) > 1 else ""))


def host_problems(hosts: list[str], out: str) -> list[str]:
    """`check_host` of every host at once, in their order ("" for a host fit to run workers)."""
    token = secrets.token_hex(8)
    probe_path = os.path.join(os.path.abspath(out), PROBE_PREFIX + token)
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe_path, "w") as f:
            f.write(token)
    except OSError as exc:
        raise RendezvousError(f"cannot write the probe file {probe_path}: {exc.strerror}") from None
    try:
        with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
            return list(pool.map(lambda host: check_host(host, probe_path, token), hosts))
    finally:
        os.unlink(probe_path)


def hostfile_launcher(path: str, world_size: int, tp: int, out: str, timeout: float, say, skip=()) -> dict:
    """Check the hostfile's hosts (but those in `skip`: gone, for a restart), start an agent on each
    that gets ranks, wait for them to join; the Cluster options."""
    try:
        entries, order = hostfile_slots(path, world_size, tp, skip)
    except HostfileError as exc:
        raise RendezvousError(f"--hostfile {exc}") from None
    names = [name for name, _ in entries]
    used = sorted(set(order))
    addresses = [resolve_host(names[h], "host") for h in used]
    say(f"checking {len(used)} hosts over ssh: {', '.join(names[h] for h in used)}")
    check_hosts([names[h] for h in used], out)
    remote = [a for a in addresses if not a.startswith("127.")]
    driver_address = outward_address(remote[0] if remote else addresses[0])
    keys = JobKeys.generate()  # this run's only: it reaches the agents on the ssh commands' stdin
    rendezvous = Rendezvous(driver_address, 0, keys)
    processes = []
    try:
        for h in used:
            slots = order.count(h)
            command = remote_python(["-m", "ringpipe.cluster", "worker", "--rdzv-endpoint", rendezvous.endpoint,
                                     "--nproc-per-node", str(slots), "--host-id", names[h], "--key-stdin",
                                     "--exit-with-stdin", "--timeout", str(timeout)])
            process = subprocess.Popen([*ssh_command(names[h]), command], stdin=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
            # stdin stays open: when this driver ends, however it ends, the remote agent sees its
            # end and stops that host's workers (--exit-with-stdin).
            process.stdin.write(keys.secret + b"\n")
            process.stdin.flush()
            process.last_line = "no message"
            process.forwarder = threading.Thread(target=_forward, args=(names[h], process), daemon=True)
            process.forwarder.start()
            processes.append((names[h], process))
        say(f"starting agents on {len(used)} hosts")
        agents = rendezvous.gather(world_size, 0, timeout, check=lambda: _ssh_alive(processes),
                                   expected_hosts={names[h] for h in used})
        agents.sort(key=lambda agent: names.index(agent.host))  # GROUP_RANK in the hostfile's order
        by_name = {agent.host: index for index, agent in enumerate(agents)}
        launcher = RendezvousLauncher(rendezvous, agents, [by_name[names[h]] for h in order])
    except BaseException:
        rendezvous.close()
        stop_processes([p for _, p in processes])
        raise
    launcher.starters = [p for _, p in processes]
    return {"launcher": launcher, "bind_host": driver_address}


def _forward(host, process):
    """Pass what the host's agent and workers write to stderr on to ours, each line marked with
    the host (a worker's lines are marked with its rank and host already); remember the last line
    for an error message."""
    for raw in process.stderr:
        line = raw.decode(errors="replace").rstrip()
        if line:
            process.last_line = line
            sys.stderr.write(f"{line}\n" if line.startswith("[rank ") else f"[{host}] {line}\n")


def _ssh_alive(processes):
    for host, process in processes:
        if process.poll() is not None:
            process.forwarder.join(timeout=2)  # its last lines say why
            last = process.last_line
            raise RendezvousError(f"host {host}: the agent started over ssh ended with exit code "
                                  f"{process.returncode} before joining ({last.removeprefix('Error: ')})")

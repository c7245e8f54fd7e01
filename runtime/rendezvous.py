"""The driver's end of a run across hosts: agents join a rendezvous, then start and watch workers.

On every other host an agent (`ringpipe worker --rdzv-endpoint HOST:PORT`, started by hand, over
ssh, by srun or by mpirun; runtime/rendezvous_agent.py) connects to the driver's `Rendezvous`, a
ROUTER socket speaking CURVE: only a process holding the rendezvous key gets in. It says which
host it is, the address its workers can bind to, and how many workers it runs (or, under mpirun
and srun, which ranks). Once the slots add up to the world size, the driver places the ranks
(runtime/placement.py) and `RendezvousLauncher` sends each agent its workers' bootstrap records;
the agent starts them as its own children and reports their pids and exit codes. From then on the
launcher answers the `Launcher` protocol for them, beside a `LocalLauncher` for the driver's own
host. Agents stop their workers when told, or when the driver has been silent for
`AGENT_SILENCE_S`: a driver that dies leaves nothing running on any host.

Messages (msgpack maps, one frame). Agent -> driver: join {host, address, slots, ranks, version,
pid}, status {codes, pids, notes}. Driver -> agent: welcome, refuse {reason}, start {boots, env},
signal {rank, signum}, stop {grace}, ping.
"""
from __future__ import annotations

import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import msgpack
import zmq

from ringpipe.runtime.addresses import bracketed, dual_stack, tcp_address
from ringpipe.runtime.auth import JobKeys
from ringpipe.runtime.launch import LocalLauncher, stop_processes
from ringpipe.runtime.version import __version__

PING_INTERVAL_S = 1.0
DEFAULT_PORT = 29500  # torchrun's
AGENT_SILENCE_S = 15.0  # an agent whose driver is silent this long stops its workers and exits
AGENT_LOST_S = 3.0  # an agent (it reports twice a second) silent this long: its host or link is down


class RendezvousError(RuntimeError):
    """The rendezvous could not form: one line naming the address, host or count that was wrong."""


def package_version() -> str:
    """The version of the ringpipe this process imported (runtime/version.py), never that of
    whatever installed metadata happens to come first on the path."""
    return __version__


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """("HOST", PORT) of "HOST:PORT", "HOST", "[IPV6]:PORT" or "[IPV6]" (PORT defaults to 29500, as
    torchrun's does); RendezvousError naming the endpoint if it is none of these or PORT is not in
    1..65535. An IPv6 address needs its brackets: in "::1:29500" the port cannot be told apart."""
    def refuse(why: str):
        return RendezvousError(f"rendezvous endpoint {endpoint!r} is not HOST:PORT ({why})")

    if endpoint.startswith("["):
        host, closing, rest = endpoint[1:].partition("]")
        if not closing or (rest and not rest.startswith(":")):
            raise refuse("an IPv6 address goes in brackets: [ADDRESS]:PORT")
        port = rest[1:] if rest else str(DEFAULT_PORT)
    elif endpoint.count(":") > 1:
        raise refuse("an IPv6 address goes in brackets: [ADDRESS]:PORT")
    else:
        host, colon, port = endpoint.partition(":")
        port = port if colon else str(DEFAULT_PORT)
    if not host:
        raise refuse("no host")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise refuse(f"port {port!r} is not a number in 1..65535")
    return host, int(port)


def resolve_host(host: str, what: str = "host") -> str:
    """The address of `host`: IPv4 if it has one, else IPv6; RendezvousError naming it if it does
    not resolve."""
    try:
        found = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RendezvousError(f"cannot resolve {what} {host!r}: {getattr(exc, 'strerror', exc)}") from None
    # IPv4 first: a name with both kinds of address resolves as it did before IPv6 was supported.
    found.sort(key=lambda entry: entry[0] != socket.AF_INET)
    if not found:
        raise RendezvousError(f"cannot resolve {what} {host!r}: no address")
    return found[0][4][0]


def outward_address(peer: str) -> str:
    """This machine's address on the route to `peer` (an IPv4 or IPv6 address): the one its
    sockets should bind to so that `peer` can reach them. No packet is sent."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer, 9))
        return probe.getsockname()[0]


@dataclass
class Agent:
    """A joined agent: the ZeroMQ identity it speaks from, and what it said in its join."""
    identity: bytes
    host: str
    address: str
    slots: int
    ranks: list | None = None
    pid: int = 0
    ranks_here: list = field(default_factory=list)  # global ranks it runs, in its local order
    last_heard: float = field(default_factory=time.monotonic)

    def lost(self) -> bool:
        """Whether nothing came from this agent for AGENT_LOST_S: its host or link is down."""
        return time.monotonic() - self.last_heard > AGENT_LOST_S


class Rendezvous:
    """A ROUTER at `address:port` (port 0: any free one) that only holders of `keys` can reach."""

    def __init__(self, address: str, port: int, keys: JobKeys):
        self.keys = keys
        self.context = dual_stack(zmq.Context())
        self.auth = keys.start_authenticator(self.context)
        self.router = self.context.socket(zmq.ROUTER)
        keys.make_server(self.router)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            if port:
                self.router.bind(tcp_address(address, port))
            else:
                port = self.router.bind_to_random_port(tcp_address(address))
        except zmq.ZMQError as exc:
            self.close()
            reason = "the port is in use" if exc.errno == zmq.EADDRINUSE else exc.strerror
            raise RendezvousError(f"cannot listen for the rendezvous at {bracketed(address)}:{port}: {reason}") from None
        self.address, self.port = address, port
        self.endpoint = f"{bracketed(address)}:{port}"

    def send(self, agent: Agent, message: dict):
        try:
            self.router.send_multipart([agent.identity, msgpack.packb(message, use_bin_type=True)])
        except zmq.ZMQError:  # that agent is gone; its workers' silence is reported by the cluster
            pass

    def receive(self, timeout_ms: int) -> tuple[bytes, dict] | None:
        if not self.router.poll(timeout_ms):
            return None
        identity, *frames = self.router.recv_multipart()
        try:
            message = msgpack.unpackb(frames[0], raw=False) if frames else None
        except (ValueError, msgpack.ExtraData):
            message = None
        return (identity, message) if isinstance(message, dict) else None

    def gather(self, world_size: int, local_slots: int, timeout: float, check=lambda: None,
               expected_hosts: set | None = None, slots_each: int | None = None,
               say=lambda message: None) -> list[Agent]:
        """Wait until the agents' slots and `local_slots` (the driver's own) add up to
        `world_size`; agents beyond that are refused, and so are agents not offering `slots_each`
        workers when it is given (torchrun's --nnodes × --nproc-per-node). `check()` runs while
        waiting and may raise (an ssh command that failed). Agents must give distinct fixed ranks
        covering what the driver does not run, or none at all."""
        agents: list[Agent] = []
        deadline, last_ping = time.monotonic() + timeout, 0.0
        while local_slots + sum(a.slots for a in agents) < world_size:
            check()
            if time.monotonic() > deadline:
                # Count only what other hosts brought: the driver's own workers never had to join.
                joined = ", ".join(f"{a.host} ({a.slots})" for a in agents) or "none"
                here = f"; the driver's host runs {local_slots} more" if local_slots else ""
                raise RendezvousError(f"only {sum(a.slots for a in agents)} of {world_size - local_slots} workers "
                                      f"from other hosts joined the rendezvous at {self.endpoint} within "
                                      f"{timeout:g}s (joined hosts: {joined}{here})")
            if time.monotonic() - last_ping > PING_INTERVAL_S:  # joined agents wait for the others
                last_ping = time.monotonic()
                for agent in agents:
                    self.send(agent, {"t": "ping"})
            got = self.receive(100)
            if got is None or got[1].get("t") != "join":
                continue
            identity, join = got
            agent = Agent(identity, str(join.get("host")), str(join.get("address")), int(join.get("slots", 0)),
                          join.get("ranks"), int(join.get("pid", 0)))
            problem = self._refusal(agent, join, agents, expected_hosts)
            if not problem and slots_each is not None and agent.slots != slots_each:
                problem = (f"it offers {agent.slots} workers; the driver at {self.endpoint} expects "
                           f"--nproc-per-node {slots_each} on every host")
            if problem:
                self.send(agent, {"t": "refuse", "reason": problem})
                continue
            agents.append(agent)
            self.send(agent, {"t": "welcome"})
            say(f"{agent.host} joined with {agent.slots} worker{'s' * (agent.slots != 1)} "
                f"({local_slots + sum(a.slots for a in agents)} of {world_size})")
        return agents

    def _refusal(self, agent, join, agents, expected_hosts) -> str:
        if join.get("version") != package_version():
            return (f"this host runs ringpipe {join.get('version')}, the driver at {self.endpoint} runs "
                    f"{package_version()}")
        if expected_hosts is not None and (agent.host not in expected_hosts or
                                           agent.host in {a.host for a in agents}):
            return f"the driver at {self.endpoint} expects no (more) agent for host {agent.host}"
        if agent.slots < 1:
            return f"an agent must run at least one worker, got {agent.slots}"
        taken = {r for a in agents for r in a.ranks or []}
        if agent.ranks is not None and (taken & set(agent.ranks)):
            return f"ranks {sorted(taken & set(agent.ranks))} have joined already"
        return ""

    def close(self):
        try:
            self.auth.stop()
        except Exception:  # noqa: BLE001
            pass
        self.context.destroy(linger=200)


class RendezvousLauncher:
    """Workers on the joined agents' hosts (and `local`, the driver's own, if given), by rank.

    `hosts[rank]` is the index of the rank's host: 0..len(agents)-1 an agent, len(agents) the
    driver's host (its `LocalLauncher`)."""

    def __init__(self, rendezvous: Rendezvous, agents: list[Agent], hosts: list[int],
                 local: LocalLauncher | None = None, local_address: str = "127.0.0.1"):
        self.rendezvous, self.agents, self.hosts, self.local = rendezvous, agents, hosts, local
        self.local_address = local_address
        self.starters: list = []  # processes that started the agents (ssh, srun): waited for on close
        self.local_ranks = [rank for rank, host in enumerate(hosts) if host == len(agents)]
        for index, agent in enumerate(agents):
            agent.ranks_here = [rank for rank, host in enumerate(hosts) if host == index]
        self.codes: dict[int, int | None] = {}
        self.pids: dict[int, int] = {}
        self.notes: dict[int, str] = {}  # what the agent said of the process's state
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.closed = False
        # From now on the agents hear from the driver every second, while it prepares the run too.
        self.thread = threading.Thread(target=self._serve, name="ringpipe-rendezvous", daemon=True)
        self.thread.start()

    def host_names(self) -> list[str]:
        """Each host's name, indexed like `hosts` (agents first, then the driver's own)."""
        return [agent.host for agent in self.agents] + [self.local.host_name if self.local else "driver"]

    # ---- the Launcher protocol ---------------------------------------------------------------------
    def start(self, boots: list[dict], env: dict | None = None) -> None:
        boots = [dict(boot, **self.place_on_host(boot["rank"])) for boot in boots]
        for agent in self.agents:
            records = [dict(boots[r], bind_host=agent.address, host=agent.host) for r in agent.ranks_here]
            self.outbox.put((agent, {"t": "start", "boots": records, "env": dict(env or {})}))
        if self.local is not None and self.local_ranks:
            self.local.start([dict(boots[r], bind_host=self.local_address) for r in self.local_ranks], env)

    def place_on_host(self, rank: int) -> dict:
        """torchrun's view of `rank` by host name, whichever agents run it (mpirun and srun start
        one per rank): its index among its host's ranks, their count, and the host's index."""
        names = [self.host(r) for r in range(len(self.hosts))]
        here = [r for r, name in enumerate(names) if name == names[rank]]
        return {"local_rank": here.index(rank), "local_world_size": len(here),
                "group_rank": sorted(set(names), key=names.index).index(names[rank])}

    def poll(self, rank: int) -> int | None:
        if rank in self.local_ranks:
            return self.local.poll(self.local_ranks.index(rank))
        return self.codes.get(rank)

    def send_signal(self, rank: int, signum: int) -> None:
        if rank in self.local_ranks:
            self.local.send_signal(self.local_ranks.index(rank), signum)
        else:
            self.outbox.put((self.agents[self.hosts[rank]], {"t": "signal", "rank": rank, "signum": int(signum)}))

    def kill_all(self, grace: float = 0.0) -> None:
        if self.closed:
            return
        for agent in self.agents:
            self.outbox.put((agent, {"t": "stop", "grace": grace}))
        if self.local is not None:
            self.local.kill_all(grace)
        # The agents stop their workers the same way (grace, SIGTERM, SIGKILL) and report; an
        # agent gone silent (its host or link is down) cannot, and is not waited for.
        deadline = time.monotonic() + grace + 5.0
        remote = [rank for rank in range(len(self.hosts)) if rank not in self.local_ranks]
        while self.thread.is_alive() and time.monotonic() < deadline and \
                any(self.codes.get(rank) is None and not self.agents[self.hosts[rank]].lost() for rank in remote):
            time.sleep(0.02)

    def clean_up(self, job_id: str) -> None:
        """The driver host's shared-memory files; agents remove theirs when they stop. Closes the
        rendezvous: the agents then exit."""
        if self.local is not None:
            self.local.clean_up(job_id)
        self.close()

    def pid(self, rank: int) -> int | None:
        if rank in self.local_ranks:
            return self.local.pid(self.local_ranks.index(rank))
        return self.pids.get(rank)

    def host(self, rank: int) -> str:
        return self.host_names()[self.hosts[rank]]

    def process_note(self, rank: int) -> str:
        if rank in self.local_ranks:
            return self.local.process_note(self.local_ranks.index(rank))
        agent = self.agents[self.hosts[rank]]
        if agent.lost():
            return (f" (its host's agent is silent too, for {time.monotonic() - agent.last_heard:.1f}s: the host "
                    "or its link is down)")
        return self.notes.get(rank, "")

    # ---- the rendezvous thread ---------------------------------------------------------------------
    def _serve(self):
        last_ping = 0.0
        while not self.stopped.is_set():
            while True:
                try:
                    agent, message = self.outbox.get_nowait()
                except queue.Empty:
                    break
                self.rendezvous.send(agent, message)
            if time.monotonic() - last_ping > PING_INTERVAL_S:
                last_ping = time.monotonic()
                for agent in self.agents:
                    self.rendezvous.send(agent, {"t": "ping"})
            got = self.rendezvous.receive(20)
            if got is None:
                continue
            identity, message = got
            agent = next((a for a in self.agents if a.identity == identity), None)
            if agent is not None:
                agent.last_heard = time.monotonic()
            if agent is None:
                if message.get("t") == "join":  # a latecomer: the world is complete
                    self.rendezvous.send(Agent(identity, "", "", 0), {"t": "refuse", "reason": "the job has started"})
                continue
            if message.get("t") == "status":
                for rank, pid in (message.get("pids") or {}).items():
                    if int(rank) in agent.ranks_here:
                        self.pids[int(rank)] = pid
                for rank, note in (message.get("notes") or {}).items():
                    if int(rank) in agent.ranks_here:
                        self.notes[int(rank)] = str(note or "")
                for rank, code in (message.get("codes") or {}).items():
                    if int(rank) in agent.ranks_here and code is not None:
                        self.codes[int(rank)] = int(code)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.stopped.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        for agent in self.agents:
            self.rendezvous.send(agent, {"t": "stop", "grace": 0.0, "bye": True})
        self.rendezvous.close()
        for starter in self.starters:  # an agent that missed the goodbye sees its stdin end
            if getattr(starter, "stdin", None) is not None and not starter.stdin.closed:
                try:
                    starter.stdin.close()
                except OSError:
                    pass
        # They end with their agents; one that lost its agent (host or link down) would only hang.
        stop_processes(self.starters, grace=0.0 if any(agent.lost() for agent in self.agents) else 5.0)


__all__ = ["Rendezvous", "RendezvousLauncher", "RendezvousError", "Agent", "outward_address", "resolve_host"]

"""How `ringpipe train` starts its workers on other hosts: the launcher chosen by its flags.

    local   --nproc N                                   children of the driver (runtime/launch.py)
    join    --rdzv-endpoint HOST:PORT --nnodes --nproc-per-node   agents join by hand (torchrun's words)
    ssh     --hostfile FILE                             agents started over ssh (cluster/ssh_launch.py)
    mpi     mpirun -np N ringpipe train --launcher mpi ...        rank 0 drives, the others are agents
    slurm   srun ... / inside salloc or sbatch          (cluster/slurm_launch.py)

Each returns the `Cluster` options (launcher, driver bind address) for `DistributedRun`, after the
hosts have joined and the placement was printed; any failure is one line naming the address, host
or file, with nothing left running.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import click

from ringpipe.cluster.hostfile import HostfileError, hostfile_slots
from ringpipe.runtime.addresses import bracketed
from ringpipe.runtime.auth import KeyFileError, create_key_file, read_key_file
from ringpipe.runtime.launch import LocalLauncher, die_with_parent
from ringpipe.runtime.placement import describe_placement, place_ranks
from ringpipe.runtime.rendezvous import (DEFAULT_PORT, Rendezvous, RendezvousError, RendezvousLauncher, parse_endpoint,
                                         resolve_host)

DEFAULT_KEY_FILE = os.path.join("~", ".ringpipe", "rendezvous.key")


def rank_from_environment(environ=os.environ) -> tuple[int, int, int, str] | None:
    """(rank, world size, local rank, launcher) set by mpirun (OpenMPI's OMPI_COMM_WORLD_*, MPICH's
    PMI_*) or srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID); None outside them."""
    for rank, size, local, name in (
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "mpi"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "mpi"),
            ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "slurm")):
        if rank in environ and size in environ:
            return int(environ[rank]), int(environ[size]), int(environ.get(local, 0)), name
    return None


def host_from_environment(environ=os.environ) -> str:
    """This host's name as the launcher knows it: Slurm's node name, else the hostname."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def die_with_launcher() -> None:
    """This process (an agent or the driver of rank 0) was started by a launcher (mpirun, srun, ssh):
    when that launcher ends (killed mpirun, cancelled job step, lost ssh session), SIGTERM ends this
    process, which first stops its workers (they die with it in any case: runtime/launch.py)."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    die_with_parent(os.getppid(), signal.SIGTERM)


def stdin_watch() -> threading.Event:
    """An event set once stdin ends: the launcher's connection to the driver (ssh, srun's input that
    the driver holds open) is gone."""
    gone = threading.Event()

    def watch():
        # The file descriptor, not sys.stdin: a daemon thread blocked inside sys.stdin's buffered
        # reader holds its lock, and the interpreter aborts at exit when it cannot take it.
        try:
            while os.read(sys.stdin.fileno(), 4096):
                pass
        except OSError:  # no stdin at all: as good as ended
            pass
        gone.set()

    threading.Thread(target=watch, name="ringpipe-stdin-watch", daemon=True).start()
    return gone


def job_keys(key_file: str | None, create: bool, timeout: float = 0.0):
    """The rendezvous key pair in `key_file` (default ~/.ringpipe/rendezvous.key); created there
    (0600) if `create` and missing, else waited for up to `timeout` seconds (mpirun's rank 0 may
    still be writing it)."""
    path = os.path.expanduser(key_file or DEFAULT_KEY_FILE)
    if create:
        return create_key_file(path)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    return read_key_file(path)


def print_placement(launcher: RendezvousLauncher, tp: int):
    """Which host runs which ranks, on stderr before training starts."""
    click.echo("placement:\n" + "\n".join(describe_placement(launcher.hosts, launcher.host_names(), tp)), err=True)


def join_launcher(endpoint: str, world_size: int, tp: int, nproc_per_node: int, key_file: str | None,
                  timeout: float, say, local_ranks: list | None = None, local_host: str | None = None,
                  nnodes: int | None = None) -> dict:
    """Listen at `endpoint`, run `nproc_per_node` workers here (or exactly `local_ranks`), wait for
    agents to bring the rest (with `nnodes`, each exactly `nproc_per_node`); the Cluster options."""
    host, port = parse_endpoint(endpoint)
    address = resolve_host(host, "rendezvous host")
    keys = job_keys(key_file, create=True)
    rendezvous = Rendezvous(address, port, keys)
    try:
        here = len(local_ranks) if local_ranks is not None else nproc_per_node
        say(f"waiting at {rendezvous.endpoint} for {world_size - here} more workers to join "
            f"(ringpipe worker --rdzv-endpoint {bracketed(host)}:{port})")
        agents = rendezvous.gather(world_size, here, timeout, say=say,
                                   slots_each=nproc_per_node if nnodes is not None else None)
        hosts = _hosts_of_ranks(agents, world_size, tp, here, local_ranks)
        launcher = RendezvousLauncher(rendezvous, agents, hosts, LocalLauncher(host_name=local_host or address),
                                      address)
    except BaseException:
        rendezvous.close()
        raise
    return {"launcher": launcher, "bind_host": address}


def _hosts_of_ranks(agents, world_size: int, tp: int, local_slots: int, local_ranks: list | None) -> list[int]:
    """Each rank's host index (agents 0.., the driver's host last). Fixed ranks (mpirun, srun)
    stay where the launcher put them; otherwise the driver's host comes first, then the agents in
    joining order, tensor-parallel groups inside a host when they can be."""
    fixed = [agent for agent in agents if agent.ranks is not None]
    if fixed or local_ranks is not None:
        if len(fixed) != len(agents):
            raise RendezvousError("agents with ranks from mpirun or srun cannot mix with agents without")
        hosts: dict[int, int] = {rank: len(agents) for rank in local_ranks or []}
        for index, agent in enumerate(agents):
            hosts.update({int(rank): index for rank in agent.ranks})
        if sorted(hosts) != list(range(world_size)):
            raise RendezvousError(f"the joined ranks {sorted(hosts)} are not 0..{world_size - 1}")
        return [hosts[rank] for rank in range(world_size)]
    order = place_ranks([local_slots] + [agent.slots for agent in agents], world_size, tp)
    return [len(agents) if host == 0 else host - 1 for host in order]


def mpi_or_slurm_agent(launcher_name: str, endpoint: str | None, key_file: str | None, timeout: float,
                       say) -> int | None:
    """Under mpirun or srun, every rank but 0 becomes an agent for its one worker: its exit code.
    None on rank 0 (it drives) and outside those launchers."""
    from ringpipe.runtime.rendezvous_agent import join_and_run

    place = rank_from_environment()
    if place is None or place[0] == 0:
        return None
    keys = job_keys(key_file, create=False, timeout=timeout)
    return join_and_run(spmd_endpoint(launcher_name, endpoint), keys, 1, host=host_from_environment(),
                        ranks=[place[0]], timeout=timeout, say=say)


def spmd_endpoint(launcher_name: str, endpoint: str | None, environ=os.environ) -> str:
    """Where rank 0 listens under mpirun or srun: --rdzv-endpoint, else MASTER_ADDR:MASTER_PORT,
    else (Slurm) the step's first node on port 29500."""
    if endpoint:
        return endpoint
    if environ.get("MASTER_ADDR"):
        return f"{bracketed(environ['MASTER_ADDR'])}:{environ.get('MASTER_PORT', DEFAULT_PORT)}"
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if launcher_name == "slurm" and nodelist:
        from ringpipe.cluster.hostfile import expand_nodelist

        return f"{expand_nodelist(nodelist)[0]}:{DEFAULT_PORT}"
    raise RendezvousError(f"--launcher {launcher_name}: give --rdzv-endpoint HOST:PORT (rank 0's host), "
                          "or set MASTER_ADDR and MASTER_PORT")


def spmd_driver(launcher_name: str, endpoint: str | None, world_size: int, tp: int, key_file: str | None,
                timeout: float, say) -> dict:
    """Rank 0 under mpirun or srun: the driver, running worker 0 itself; the Cluster options."""
    place = rank_from_environment()
    if place is None:
        raise RendezvousError(f"--launcher {launcher_name}: no rank in the environment (run this command "
                              f"under {'mpirun' if launcher_name == 'mpi' else 'srun'})")
    if place[1] != world_size:
        raise RendezvousError(f"--launcher {launcher_name}: {place[1]} processes, but dp × tp × pp = {world_size}")
    return join_launcher(spmd_endpoint(launcher_name, endpoint), world_size, tp, 1, key_file, timeout, say,
                         local_ranks=[0], local_host=host_from_environment())


def multihost_options(command):
    """`ringpipe train`'s flags for runs across hosts."""
    from ringpipe.cluster.options import FiniteFloat

    options = [
        click.option("--launcher", type=click.Choice(["local", "ssh", "join", "mpi", "slurm"]), default=None,
                     help="How workers start [default: ssh with --hostfile, join with --rdzv-endpoint, else "
                          "local]; mpi and slurm: run this command under mpirun or srun (or, slurm, inside an "
                          "allocation)."),
        click.option("--hostfile", type=click.Path(dir_okay=False), default=None,
                     help="Hosts to run on over ssh: lines 'HOST slots=K' ('#' comments)."),
        click.option("--nnodes", type=click.IntRange(min=1), default=None,
                     help="Hosts joining the rendezvous (with this one)."),
        click.option("--nproc-per-node", type=click.IntRange(min=0), default=None,
                     help="Workers on this host when others join (--rdzv-endpoint)."),
        click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                     help="Listen here for `ringpipe worker --rdzv-endpoint HOST:PORT` from the other hosts."),
        click.option("--key-file", default=None,
                     help="The rendezvous key (0600; made if missing) [default: ~/.ringpipe/rendezvous.key]."),
        click.option("--rdzv-timeout", type=FiniteFloat(min=0, min_open=True), default=300.0, show_default=True,
                     help="Seconds to wait for the other hosts to join."),
    ]
    for option in reversed(options):  # click lists them in this order
        command = option(command)
    return command


def launcher_of(flags: dict) -> str:
    """The launcher the flags ask for: --launcher, else ssh with --hostfile, join with
    --rdzv-endpoint, else local."""
    if flags.get("launcher"):
        return flags["launcher"]
    return "ssh" if flags.get("hostfile") else "join" if flags.get("rdzv_endpoint") else "local"


def check_multihost_flags(ctx, flags: dict, world_size: int, tp: int = 1) -> None:
    """Refuse flags that cannot start `world_size` workers with the chosen launcher (one line)."""
    from ringpipe.cluster.options import bad_flag

    name = flags["launcher"]
    if ctx.get_parameter_source("nproc") == click.core.ParameterSource.COMMANDLINE:
        raise bad_flag("--nproc", f"counts the workers of --launcher local; with --launcher {name} the hosts' "
                                  "slots do (dp × tp × pp of them)")
    if name == "ssh" and not flags["hostfile"]:
        raise bad_flag("--launcher", "ssh needs --hostfile FILE")
    if flags["hostfile"] and name != "ssh":
        raise bad_flag("--hostfile", f"starts workers over ssh; it cannot be combined with --launcher {name}")
    # Read before anything is tokenized or started: a bad file or endpoint is then the only output.
    if name == "ssh":
        try:
            entries, order = hostfile_slots(flags["hostfile"], world_size, tp)
            for host in sorted({entries[h][0] for h in order}):
                resolve_host(host, "host")
        except HostfileError as exc:
            raise bad_flag("--hostfile", str(exc)) from None
        except RendezvousError as exc:
            raise bad_flag("--hostfile", f"{flags['hostfile']}: {exc}") from None
    if name in ("mpi", "slurm") and (name != "slurm" or not os.environ.get("SLURM_JOB_ID")):
        place = rank_from_environment()  # (srun inside an allocation starts its tasks itself)
        if place is None or place[3] != name:
            raise bad_flag("--launcher", "mpi: no MPI rank in the environment; run this command under mpirun"
                           if name == "mpi" else "slurm: not inside a Slurm allocation (no SLURM_JOB_ID); run it "
                           "under salloc, sbatch or srun")
        if place[1] != world_size:
            raise bad_flag("--launcher", f"{name}: {place[1]} processes, but dp × tp × pp = {world_size}")
    if flags["rdzv_endpoint"]:
        try:
            parse_endpoint(flags["rdzv_endpoint"])
        except RendezvousError as exc:
            raise bad_flag("--rdzv-endpoint", str(exc)) from None
    if name == "join":
        if not flags["rdzv_endpoint"]:
            raise bad_flag("--launcher", "join needs --rdzv-endpoint HOST:PORT")
        nnodes, here = flags["nnodes"], flags["nproc_per_node"]
        if here is None:
            here = world_size // nnodes if nnodes and world_size % nnodes == 0 else 1
            flags["nproc_per_node"] = here
        if nnodes is not None and nnodes * here != world_size:
            raise bad_flag("--nnodes", f"{nnodes} hosts × --nproc-per-node {here} = {nnodes * here} workers, "
                                       f"but dp × tp × pp = {world_size}")
        if here > world_size:
            raise bad_flag("--nproc-per-node", f"{here} is more than dp × tp × pp = {world_size} workers")


def spmd_agent(flags: dict) -> int | None:
    """Under mpirun or srun (--launcher mpi, slurm), every rank but 0 is an agent for its one
    worker: its exit code; None where this process drives (rank 0, or no such launcher)."""
    if flags["launcher"] not in ("mpi", "slurm"):
        return None
    if rank_from_environment() is not None:
        die_with_launcher()
    if flags["rdzv_endpoint"]:
        from ringpipe.cluster.options import bad_flag

        try:
            parse_endpoint(flags["rdzv_endpoint"])
        except RendezvousError as exc:  # a flag's value: a usage error on every rank, as on rank 0
            raise bad_flag("--rdzv-endpoint", str(exc)) from None
    try:
        return mpi_or_slurm_agent(flags["launcher"], flags["rdzv_endpoint"], flags["key_file"],
                                  flags["rdzv_timeout"], say=lambda message: None)
    except (KeyFileError, RendezvousError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None


def cluster_options(flags: dict, layout, out: str, say) -> dict:
    """Start the other hosts' side of the run (they join; the placement is printed) and return the
    `Cluster` options for it; {} for local workers."""
    name, timeout = flags["launcher"], flags["rdzv_timeout"]
    if name == "join":
        options = join_launcher(flags["rdzv_endpoint"], layout.world_size, layout.tp, flags["nproc_per_node"],
                                flags["key_file"], timeout, say, nnodes=flags["nnodes"])
    elif name == "ssh":
        from ringpipe.cluster.ssh_launch import hostfile_launcher

        options = hostfile_launcher(flags["hostfile"], layout.world_size, layout.tp, out, timeout, say,
                                    skip=flags.get("hosts_gone", ()))
    elif name == "slurm" and rank_from_environment() is None:
        from ringpipe.cluster.slurm_launch import allocation_launcher

        options = allocation_launcher(layout.world_size, timeout, say)
    elif name in ("mpi", "slurm"):
        options = spmd_driver(name, flags["rdzv_endpoint"], layout.world_size, layout.tp, flags["key_file"],
                              timeout, say)
    else:
        return {}
    print_placement(options["launcher"], layout.tp)
    return options


__all__ = ["join_launcher", "spmd_driver", "mpi_or_slurm_agent", "rank_from_environment",
           "KeyFileError", "RendezvousError"]

"""The communication libraries the benchmarks compare, behind one per-rank handle (`Ops`): ringpipe's
communicator, torch.distributed's gloo backend, and OpenMPI through mpi4py.

A benchmark is a function `measure(ops, **args) -> result`, named "module:function" so that any
library's processes can import it. `run(library, world_size, measure, args)` starts fresh processes
for that library, runs `measure` on every rank and returns the results ordered by rank. A peer
library that is not installed here, or whose processes fail or hang, raises LibraryUnavailable,
whose message is one line saying why; ringpipe's own errors propagate as they are.
"ringpipe@PATH" is ringpipe from another checkout (e.g. the commit a change started from), run in
a fresh process as a peer is, for A/B rounds in one sitting.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ringpipe.runtime.files import write_json
from ringpipe.runtime.launch import BLAS_THREAD_VARIABLES, reaching_this_package

LIBRARIES = ("ringpipe", "gloo", "mpi")
PEERS = ("gloo", "mpi")
CHECKOUT = "ringpipe@"  # "ringpipe@PATH": another checkout of ringpipe
PEER_TIMEOUT = 900.0  # seconds for one run of a peer library, a deadline (not a speed target)


class LibraryUnavailable(Exception):
    """A peer library cannot run here, or its run failed; the message is one line saying why."""


@dataclass
class Ops:
    """One rank's handle on a library, on 1-D float32 buffers of the library's array type.

    all_reduce / all_gather / reduce_scatter / broadcast (root 0) take x and return the result;
    sendrecv(x, out) sends x to rank+1 and receives from rank-1 into out; send(x, dst) and
    recv(out, src) block until done (recv returns the received array); array(numpy) makes a buffer.
    """

    rank: int
    size: int
    all_reduce: Callable
    all_gather: Callable
    reduce_scatter: Callable
    broadcast: Callable
    sendrecv: Callable
    send: Callable
    recv: Callable
    barrier: Callable
    array: Callable


def _measure_function(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def run(library: str, world_size: int, measure: str, args: dict, algorithm: str = "auto",
        timeout: float = PEER_TIMEOUT) -> list:
    """`measure(ops, **args)` on `world_size` fresh ranks of `library`; the results by rank.
    `algorithm` forces ringpipe's collective algorithm (the peers choose their own); a peer that
    has not finished after `timeout` seconds is stopped (LibraryUnavailable)."""
    if library == "ringpipe":
        return run_ringpipe(world_size, measure, args, algorithm)
    if library == "gloo":
        return run_gloo(world_size, measure, args, timeout)
    if library == "mpi":
        return run_mpi(world_size, measure, args, timeout)
    if library.startswith(CHECKOUT):
        return run_ringpipe_at(library[len(CHECKOUT):], world_size, measure, args, algorithm, timeout)
    raise ValueError(f"unknown library {library!r}; choose from {', '.join(LIBRARIES)} or {CHECKOUT}PATH")


# ---- ringpipe ---------------------------------------------------------------------------------------
def ringpipe_ops(comm) -> Ops:
    n, rank = comm.size, comm.rank

    def sendrecv(x, out):
        from ringpipe.runtime.shm_p2p_single_copy import sendrecv

        return sendrecv(comm, x, (rank + 1) % n, (rank - 1) % n, out=out)

    return Ops(rank, n, all_reduce=comm.all_reduce, all_gather=comm.all_gather, reduce_scatter=comm.reduce_scatter,
               broadcast=lambda x: comm.broadcast(x, 0), sendrecv=sendrecv, send=comm.send,
               recv=lambda out, src: comm.recv(src, out=out), barrier=comm.barrier, array=lambda a: a)


def _ringpipe_rank(comm, measure, args):
    return _measure_function(measure)(ringpipe_ops(comm), **args)


def run_ringpipe(world_size, measure, args, algorithm="auto") -> list:
    from ringpipe.runtime import Cluster

    with Cluster(world_size, threads_per_worker=1, algorithm=algorithm) as cluster:
        return cluster.run(_ringpipe_rank, measure, args)


def check_checkout(path: str) -> str:
    """`path` as an absolute folder holding a ringpipe checkout; ValueError naming it otherwise."""
    if not os.path.isfile(os.path.join(path, "runtime", "__init__.py")):
        raise ValueError(f"{CHECKOUT}{path}: not a ringpipe checkout (no runtime/__init__.py there)")
    return os.path.abspath(path)


def run_ringpipe_at(path: str, world_size, measure, args, algorithm="auto", timeout=PEER_TIMEOUT) -> list:
    """`run_ringpipe` of the checkout at `path`, in a fresh process that imports only that one (a
    folder with a `ringpipe` link to it first on its PYTHONPATH)."""
    path = check_checkout(path)
    code = ("import json, sys; from ringpipe.tools.bench_libraries import run_ringpipe; "
            "from ringpipe.runtime.files import write_json; "
            "write_json(sys.argv[5], run_ringpipe(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]))")
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, os.path.join(tmp, "ringpipe"))
        out_path = os.path.join(tmp, "result.json")
        env = dict(os.environ, PYTHONPATH=tmp, **{var: "1" for var in BLAS_THREAD_VARIABLES})
        with open(os.path.join(tmp, "log"), "wb") as log:
            proc = subprocess.Popen([sys.executable, "-c", code, str(world_size), measure, json.dumps(args), algorithm,
                                     out_path], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _stop(proc)
                raise LibraryUnavailable(f"{CHECKOUT}{path} did not finish within {timeout:g} s; stopped it") from None
        if proc.returncode:
            raise LibraryUnavailable(f"{CHECKOUT}{path} failed (exit code {proc.returncode}): "
                                     f"{_last_line(os.path.join(tmp, 'log'))}")
        with open(out_path) as f:
            return json.load(f)


# ---- gloo (torch.distributed) ----------------------------------------------------------------------
def gloo_ops(rank: int, world_size: int) -> Ops:
    import torch
    import torch.distributed as dist

    outputs = {}  # one output buffer per shape, as a user of the *_into_tensor calls keeps them

    def output(kind, numel, dtype):
        if (kind, numel) not in outputs:
            outputs[kind, numel] = torch.empty(numel, dtype=dtype)
        return outputs[kind, numel]

    def all_reduce(x):
        dist.all_reduce(x)
        return x

    def all_gather(x):
        out = output("all_gather", x.numel() * world_size, x.dtype)
        dist.all_gather_into_tensor(out, x)
        return out

    def reduce_scatter(x):
        out = output("reduce_scatter", x.numel() // world_size, x.dtype)
        dist.reduce_scatter_tensor(out, x)
        return out

    def broadcast(x):
        dist.broadcast(x, 0)
        return x

    def sendrecv(x, out):
        pair = [dist.P2POp(dist.isend, x, (rank + 1) % world_size), dist.P2POp(dist.irecv, out, (rank - 1) % world_size)]
        for request in dist.batch_isend_irecv(pair):
            request.wait()
        return out

    def recv(out, src):
        dist.recv(out, src)
        return out

    return Ops(rank, world_size, all_reduce=all_reduce, all_gather=all_gather, reduce_scatter=reduce_scatter,
               broadcast=broadcast, sendrecv=sendrecv, send=dist.send, recv=recv, barrier=dist.barrier,
               array=torch.from_numpy)


def gloo_rank(rank: str, world_size: str, port: str, measure: str, args: str, out_path: str):
    """The body of one gloo rank's process (arguments as on its command line)."""
    import torch
    import torch.distributed as dist

    rank, world_size = int(rank), int(world_size)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    write_json(f"{out_path}.{rank}", _measure_function(measure)(gloo_ops(rank, world_size), **json.loads(args)))
    dist.destroy_process_group()


def run_gloo(world_size, measure, args, timeout=PEER_TIMEOUT) -> list:
    if importlib.util.find_spec("torch") is None:
        raise LibraryUnavailable(f"torch is not installed for {sys.executable} (pip install torch)")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        raise LibraryUnavailable("this torch has no torch.distributed gloo backend")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from ringpipe.tools.bench_libraries import gloo_rank; gloo_rank(*sys.argv[1:])"
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result")
        commands = [[sys.executable, "-c", code, str(rank), str(world_size), str(port), measure, json.dumps(args),
                     out_path] for rank in range(world_size)]
        run_processes("gloo", commands, tmp, timeout)
        return _read_results(out_path, world_size)


# ---- OpenMPI (mpi4py) -------------------------------------------------------------------------------
def mpi_ops(comm) -> Ops:
    from mpi4py import MPI

    rank, n = comm.Get_rank(), comm.Get_size()
    outputs = {}  # one output buffer per shape, as an MPI program keeps its receive buffers

    def output(kind, count):
        if (kind, count) not in outputs:
            outputs[kind, count] = np.empty(count, np.float32)
        return outputs[kind, count]

    def all_reduce(x):  # in place, as ringpipe's and gloo's
        comm.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
        return x

    def all_gather(x):
        out = output("all_gather", x.size * n)
        comm.Allgather(x, out)
        return out

    def reduce_scatter(x):
        out = output("reduce_scatter", x.size // n)
        comm.Reduce_scatter_block(x, out, op=MPI.SUM)
        return out

    def broadcast(x):
        comm.Bcast(x, root=0)
        return x

    def sendrecv(x, out):
        comm.Sendrecv(x, dest=(rank + 1) % n, recvbuf=out, source=(rank - 1) % n)
        return out

    def recv(out, src):
        comm.Recv(out, source=src)
        return out

    return Ops(rank, n, all_reduce=all_reduce, all_gather=all_gather, reduce_scatter=reduce_scatter,
               broadcast=broadcast, sendrecv=sendrecv, send=lambda x, dst: comm.Send(x, dest=dst), recv=recv,
               barrier=comm.Barrier, array=lambda a: a)


def mpi_rank(measure: str, args: str, out_path: str):
    """The body of one MPI rank's process (started by mpirun; arguments as on its command line)."""
    import mpi4py

    # MPI_Init, not mpi4py's default MPI_Init_thread(MULTIPLE): the benchmark is single-threaded,
    # and OpenMPI's thread-multiple mode adds locking to every call.
    mpi4py.rc.thread_level = "single"
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    write_json(f"{out_path}.{comm.Get_rank()}", _measure_function(measure)(mpi_ops(comm), **json.loads(args)))


def run_mpi(world_size, measure, args, timeout=PEER_TIMEOUT) -> list:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise LibraryUnavailable("mpirun is not on PATH (Debian: apt-get install openmpi-bin libopenmpi-dev)")
    if importlib.util.find_spec("mpi4py") is None:
        raise LibraryUnavailable(f"mpi4py is not installed for {sys.executable} (pip install mpi4py)")
    code = "import sys; from ringpipe.tools.bench_libraries import mpi_rank; mpi_rank(*sys.argv[1:])"
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result")
        # --oversubscribe: more ranks than cores is the point of the 4-rank runs on 2 cores.
        command = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(world_size),
                   sys.executable, "-c", code, measure, json.dumps(args), out_path]
        run_processes("mpi", [command], tmp, timeout)
        return _read_results(out_path, world_size)


# ---- processes of the peer libraries ----------------------------------------------------------------
def run_processes(library: str, commands: list[list[str]], log_dir: str, timeout: float = PEER_TIMEOUT):
    """Run `commands` at once, each in a session of its own, output to log files. Returns when all
    exited 0; raises LibraryUnavailable when one fails (naming its last line of output) or when
    `timeout` seconds pass, and then stops the others (a rank left waiting for a dead peer would
    wait forever)."""
    env = reaching_this_package(dict(os.environ, **{var: "1" for var in BLAS_THREAD_VARIABLES}))
    logs = [os.path.join(log_dir, f"log.{i}") for i in range(len(commands))]
    procs = []
    try:
        for command, log in zip(commands, logs):
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            for proc, log in zip(procs, logs):
                if proc.poll():
                    raise LibraryUnavailable(f"{library} failed (exit code {proc.returncode}): {_last_line(log)}")
            if all(proc.returncode == 0 for proc in procs):
                return
            if time.monotonic() > deadline:
                raise LibraryUnavailable(f"{library} did not finish within {timeout:g} s; stopped it")
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 10.0):
    """Stop `proc` (started in a session of its own) and whatever is left in its session: SIGTERM
    first, which mpirun passes on to its ranks, then SIGKILL (each rank has a process group of its
    own, so killing mpirun's group would orphan them)."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile, or no /proc here
                continue
            if int(fields[3]) == session and int(entry) != session:  # field 6 of stat: the session id
                members.append(int(entry))
    return members


def _last_line(path: str) -> str:
    """The log's last Python exception line (mpirun appends banners of its own after the rank's
    traceback), else its last line that is not a rule of dashes."""
    with open(path, "rb") as f:
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line.strip("-")]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["no output"])[-1]


def _read_results(out_path: str, world_size: int) -> list:
    results = []
    for rank in range(world_size):
        with open(f"{out_path}.{rank}") as f:
            results.append(json.load(f))
    return results

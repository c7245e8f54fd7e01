"""`ringpipe train --launcher slurm` inside an allocation (salloc, sbatch): one srun job step runs a
`ringpipe worker` per task, each taking its rank from SLURM_PROCID and its host from
SLURMD_NODENAME; they join this driver's rendezvous. The fresh key reaches them on srun's stdin,
which srun hands to every task (`--input=all`). Under srun itself (`srun ringpipe train
--launcher slurm`) rank 0 drives instead: see cluster/launchers.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

from ringpipe.cluster.hostfile import expand_nodelist
from ringpipe.runtime.auth import JobKeys
from ringpipe.runtime.launch import reaching_this_package, stop_processes
from ringpipe.runtime.rendezvous import (Rendezvous, RendezvousError, RendezvousLauncher, outward_address,
                                         resolve_host)


def allocation_launcher(world_size: int, timeout: float, say, environ=os.environ) -> dict:
    """Start `world_size` workers with srun in the current allocation; the Cluster options."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not environ.get("SLURM_JOB_ID") or not nodelist:
        raise RendezvousError("--launcher slurm: not inside a Slurm allocation (no SLURM_JOB_ID); run it under "
                              "salloc or sbatch, or every rank under srun")
    nodes = expand_nodelist(nodelist)
    address = outward_address(resolve_host(nodes[0], "Slurm node"))
    keys = JobKeys.generate()
    rendezvous = Rendezvous(address, 0, keys)
    srun = None
    try:
        command = ["srun", f"--ntasks={world_size}", "--kill-on-bad-exit=1", "--input=all", sys.executable, "-m",
                   "ringpipe.cluster", "worker", "--rdzv-endpoint", rendezvous.endpoint, "--key-stdin",
                   "--exit-with-stdin", "--timeout", str(timeout)]
        say(f"starting {world_size} workers with srun on {nodelist}")
        srun = subprocess.Popen(command, stdin=subprocess.PIPE, env=reaching_this_package(dict(environ)),
                                start_new_session=True)
        srun.stdin.write(keys.secret + b"\n")  # open until the end: the tasks stop when it closes
        srun.stdin.flush()

        def srun_alive():
            if srun.poll() is not None:
                raise RendezvousError(f"srun ended with exit code {srun.returncode} before its {world_size} tasks "
                                      f"joined (allocation {environ['SLURM_JOB_ID']}: too few CPUs for "
                                      f"{world_size} tasks?)")

        agents = rendezvous.gather(world_size, 0, timeout, check=srun_alive)
        hosts = {int(rank): index for index, agent in enumerate(agents) for rank in agent.ranks or []}
        if sorted(hosts) != list(range(world_size)):
            raise RendezvousError(f"srun's tasks joined as ranks {sorted(hosts)}, not 0..{world_size - 1}")
        launcher = RendezvousLauncher(rendezvous, agents, [hosts[rank] for rank in range(world_size)])
    except BaseException:
        rendezvous.close()
        if srun is not None:
            stop_processes([srun])
        raise
    launcher.starters = [srun]
    return {"launcher": launcher, "bind_host": address}

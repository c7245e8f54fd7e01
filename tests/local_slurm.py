"""A real single-machine Slurm for tests: munged, slurmctld and slurmd (Debian's slurm-wlm and munge)
with a configuration written here: their own ports, folders and munge socket, so nothing of the
machine's is used or changed. proctrack/linuxproc and task/none need no cgroups."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """`with LocalSlurm(cpus=8) as slurm:` then run `srun`/`salloc` with `slurm.environment`."""

    def __init__(self, cpus: int = 8):
        self.cpus = cpus
        self.processes: list[subprocess.Popen] = []
        self.directory = None
        self.environment: dict = {}

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _start(self):
        missing = [name for name, path in DAEMONS.items() if not os.path.exists(path)]
        if missing or shutil.which("srun") is None:
            raise SlurmUnavailable(f"{', '.join(missing) or 'srun'} missing (Debian's slurm-wlm and munge; "
                                   ".ci/install_multihost.sh)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test's slurmd runs jobs as root, so it needs root")
        self.directory = d = tempfile.mkdtemp(prefix="ringpipe-slurm-")
        os.makedirs(f"{d}/state"), os.makedirs(f"{d}/spool")
        with open(f"{d}/munge.key", "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(f"{d}/munge.key", 0o600)
        node = socket.gethostname()
        with open(f"{d}/slurm.conf", "w") as f:
            f.write(f"""ClusterName=ringpipe
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
MinJobAge=5
AccountingStorageType=accounting_storage/none
NodeName={node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        # MinJobAge=5: `sbatch --wait` sleeps 2 s between polls, 4× longer each time while that is
        # under MinJobAge/2 (default 300: it looked after 2, 10 and 42 s, so a 10 s job took 42 s).
        # With 5 it stays at 2 s, and a finished job's record still outlasts one poll.
        self.environment = dict(os.environ, SLURM_CONF=f"{d}/slurm.conf")
        self._daemon("munged", "-F", "--force", f"--socket={d}/munge.socket", f"--key-file={d}/munge.key",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed")
        self._wait_for(lambda: os.path.exists(f"{d}/munge.socket"), "munged")
        self._daemon("slurmctld", "-D", "-i")
        self._daemon("slurmd", "-D", "-N", node)
        self._wait_for(self._node_idle, "slurmd to register with slurmctld")

    def wait_for_job(self, job_id: str, timeout: float) -> str:
        """The final `JobState=... ExitCode=...` of batch job `job_id`, polled every 0.1 s:
        `sbatch --wait` polls every 2 s, which was most of a short job's time. Raises
        TimeoutError naming the job and its last state after `timeout` seconds."""
        deadline, state = time.monotonic() + timeout, "no record"
        while time.monotonic() < deadline:
            shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.environment,
                                   capture_output=True, text=True).stdout.split()
            fields = dict(field.split("=", 1) for field in shown if "=" in field)
            state = f"JobState={fields.get('JobState')} ExitCode={fields.get('ExitCode')}"
            if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return state
            time.sleep(0.1)
        raise TimeoutError(f"Slurm job {job_id} still {state} after {timeout} s")

    def _daemon(self, name, *args):
        self.processes.append(subprocess.Popen([DAEMONS[name], *args], env=self.environment,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.environment, capture_output=True, text=True)
        return done.stdout.strip() in ("idle", "mix")

    def _wait_for(self, ready, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not ready():
            ended = [p.args[0] for p in self.processes if p.poll() is not None]
            if ended or time.monotonic() > deadline:
                log = ""
                for name in ("slurmctld", "slurmd", "munged"):
                    try:
                        with open(f"{self.directory}/{name}.log") as f:
                            log = log or next((l.strip() for l in reversed(f.readlines()) if "error" in l), "")
                    except OSError:
                        pass
                raise SlurmUnavailable(f"waiting for {what}: {'ended: ' + ', '.join(ended) if ended else 'timed out'}"
                                       f"{' (' + log + ')' if log else ''}")
            time.sleep(0.1)

    def close(self):
        for process in reversed(self.processes):
            if process.args[0] == DAEMONS["slurmd"]:
                process.kill()  # it can take 9 s to end after jobs ran; its state is thrown away
            else:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

"""How the driver brings its workers up: it hands the launcher one bootstrap record per rank, then
waits for every worker to register, connect to its peers and unlink its shared memory. A worker that
dies or stays silent meanwhile fails the start-up with the usual `WorkerLost` and its report.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

from ringpipe.runtime.calls import WorkerLost, WorkerUnresponsive


class StartUp:
    """Mixed into `Cluster`: uses its launcher, router, `_check_processes`, `_parse`, `_broadcast`,
    `_die` and `_liveness`."""

    def _start_workers(self, bind_host, start_timeout, arena_bytes, extra_env):
        boots = [{"rank": rank, "world_size": self.world_size, "job_id": self.job_id, "driver": self.address,
                  "keys": self.keys.to_dict(), "bind_host": bind_host, "comm": asdict(self.comm_config),
                  "sys_path": list(sys.path), "cwd": os.getcwd(), "threads": self.threads_per_worker,
                  "start_timeout": start_timeout, "arena_bytes": arena_bytes, "restart_count": self.restart_count,
                  "heartbeat_interval": self.heartbeat_interval, "log_path": self.log_paths[rank],
                  "cpu_bind": self.cpu_bind}
                 for rank in range(self.world_size)]
        try:
            self._start_and_join(boots, extra_env, start_timeout)
        except WorkerLost as lost:  # stop the others, then say what happened to each
            self._die(lost)
            raise

    def _start_and_join(self, boots, extra_env, start_timeout):
        self.launcher.start(boots, extra_env)
        registered = self._gather("register", start_timeout)
        self.worker_addresses = [registered[r] for r in range(self.world_size)]
        book = [{"rank": r, "data": e["data"], "host": e["host"], "arena": e["arena"]}
                for r, e in enumerate(self.worker_addresses)]
        self._broadcast({"t": "book", "peers": book})
        self._gather("ready", start_timeout)
        self._broadcast({"t": "unlink"})
        self._gather("unlinked", start_timeout)
        self._liveness.start()

    def _gather(self, kind: str, timeout: float) -> dict[int, dict]:
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.world_size:
            self._check_processes(starting=True)
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(got))
                pids, host = [self.launcher.pid(r) for r in missing], self.launcher.host(missing[0])
                raise WorkerUnresponsive(f"worker ranks {missing} (pids {pids}; the first on host {host}) did not "
                                         f"send '{kind}' within {timeout}s of start-up", missing[0], pids[0],
                                         "start-up", host, reason=f"did not send '{kind}' within {timeout}s")
            if not self._router.poll(50):
                continue
            frames = self._router.recv_multipart()
            rank, value = self._parse(frames)
            if rank is None:
                continue
            if value.get("t") == "fatal":
                self._fatal[rank] = value.get("traceback", "")
                continue
            if value.get("t") == "beat":  # a rank done with start-up beats while the others catch up
                continue
            if value.get("t") != kind:
                raise RuntimeError(f"worker rank {rank} sent {value.get('t')!r} while starting, expected {kind!r}")
            got[rank] = value
        return got

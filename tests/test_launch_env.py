"""What every launcher gives its workers: torchrun's environment, and the host identity it chose."""
import os

import pytest

from ringpipe.runtime import Cluster, LocalLauncher
from ringpipe.runtime.launch import conventional_env

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


def _environment(comm):
    return {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}


@pytest.mark.timeout(60)
def test_local_workers_get_torchruns_environment_naming_the_driver_and_the_restart_count():
    with Cluster(2, restart_count=1) as cluster:  # the second start of a job (--max-restarts)
        seen = cluster.run(_environment)
    address, port = cluster.address.removeprefix("tcp://").rsplit(":", 1)
    for rank, env in enumerate(seen):
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "GROUP_RANK": "0", "MASTER_ADDR": address, "MASTER_PORT": port,
                       "TORCHELASTIC_RESTART_COUNT": "1"}
    assert address == "127.0.0.1"  # a run on one host binds to loopback only


@pytest.mark.timeout(60)
def test_the_host_identity_workers_report_is_the_one_their_launcher_chose():
    with Cluster(2, launcher=LocalLauncher(host_name="namespace-a")) as cluster:
        assert [entry["host"] for entry in cluster.worker_addresses] == ["namespace-a", "namespace-a"]


def test_the_environment_of_a_joined_worker_names_its_place_on_its_host():
    boot = {"rank": 5, "world_size": 8, "driver": "tcp://198.18.0.254:4100", "restart_count": 2}
    env = conventional_env(boot, local_rank=1, local_world_size=4, group_rank=1)
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                   "MASTER_ADDR": "198.18.0.254", "MASTER_PORT": "4100", "TORCHELASTIC_RESTART_COUNT": "2"}

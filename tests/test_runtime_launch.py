"""The launcher seam: Cluster starts, watches and stops workers only through a `Launcher`."""
import ast
import inspect
import os

import pytest

from ringpipe.runtime import cluster as runtime_cluster
from ringpipe.runtime import Cluster, Launcher, LocalLauncher


class RecordingLauncher(LocalLauncher):
    """Local processes, with every call the cluster makes written down."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def start(self, boots, env=None):
        self.calls.append(("start", [b["rank"] for b in boots], dict(env or {})))
        super().start(boots, env)

    def kill_all(self, grace=0.0):
        self.calls.append(("kill_all",))
        super().kill_all(grace)

    def clean_up(self, job_id):
        self.calls.append(("clean_up", job_id))
        super().clean_up(job_id)


def _pid_and_variable(comm):
    return os.getpid(), os.environ.get("RINGPIPE_TEST_VARIABLE")


def test_the_local_launcher_implements_the_launcher_protocol():
    assert isinstance(LocalLauncher(), Launcher)


@pytest.mark.timeout(60)
def test_a_cluster_starts_and_stops_its_workers_through_the_launcher_it_is_given():
    launcher = RecordingLauncher()
    with Cluster(2, launcher=launcher, env={"RINGPIPE_TEST_VARIABLE": "x"}) as cluster:
        assert cluster.run(_pid_and_variable) == [[pid, "x"] for pid in cluster.pids]
        assert cluster.pids == [launcher.pid(0), launcher.pid(1)]
        assert launcher.calls == [("start", [0, 1], {"RINGPIPE_TEST_VARIABLE": "x"})]
    assert ("kill_all",) in launcher.calls and ("clean_up", cluster.job_id) in launcher.calls
    assert [launcher.poll(rank) is not None for rank in range(2)] == [True, True]


def test_the_cluster_module_starts_or_signals_no_process_itself():
    tree = ast.parse(inspect.getsource(runtime_cluster))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"subprocess", "signal", "glob"}
    calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not {c for c in calls if c.startswith(("os.kill", "os.unlink", "subprocess."))}

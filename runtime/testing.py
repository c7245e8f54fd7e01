"""Localhost multi-process testing: run a function on N local workers and assert on the results.

Public API:
    from ringpipe.runtime.testing import run_local
    results = run_local(fn, 4, *args)                  # one-off cluster, closed afterwards
    (world_size is positional: `run_local(fn, world_size=4, *args)` would pass args as world_size)

As a pytest plugin (registered through the `pytest11` entry point when ringpipe is installed):
    def test_sum(local_cluster):
        cluster = local_cluster(4)                      # reused across tests in the session
        assert cluster.run(fn) == [...]

`fn` must be a module-level function of an importable module (a test module is fine). Clusters
are kept per (world size, options) for the whole session, so tests pay the start-up once; a
cluster whose worker died is replaced transparently.
"""
from __future__ import annotations

from ringpipe.runtime.cluster import Cluster


def run_local(fn, world_size: int, *args, timeout: float | None = 120.0, cluster_options: dict | None = None,
              **kwargs) -> list:
    """Start `world_size` local workers, run `fn(comm, *args, **kwargs)` on each, close, return results."""
    with Cluster(world_size, **(cluster_options or {})) as cluster:
        return cluster.run(fn, *args, timeout=timeout, **kwargs)


class ClusterPool:
    """Clusters shared by many tests, keyed by their world size and options."""

    def __init__(self):
        self._clusters: dict = {}

    def get(self, world_size: int, **options) -> Cluster:
        key = (world_size, tuple(sorted(options.items())))
        cluster = self._clusters.get(key)
        if cluster is None or cluster.failure is not None or cluster._closed:
            if cluster is not None:
                cluster.close()
            cluster = Cluster(world_size, **options)
            self._clusters[key] = cluster
        return cluster

    def close(self):
        for cluster in self._clusters.values():
            cluster.close()
        self._clusters.clear()


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def local_cluster_pool():
        pool = ClusterPool()
        yield pool
        pool.close()

    @pytest.fixture
    def local_cluster(local_cluster_pool):
        """Factory fixture: `local_cluster(n, **options)` returns a running n-worker Cluster."""
        return local_cluster_pool.get

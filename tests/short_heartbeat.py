"""A heartbeat bound of 3 s rather than the product's 8 s, for the tests of `ringpipe train` that wait
one out (a stopped worker is noticed only by its silence): the same path, 5 s sooner.

    use_short_heartbeat(monkeypatch)        # `ringpipe train` run in this process (run_cli)
    python -m tests.short_heartbeat ARGS    # the `ringpipe` command in a process of its own

The product's default stays 8 s; tests/test_runtime_liveness.py waits that default out once."""
import ringpipe.cluster.distributed_train as distributed_train
from ringpipe.runtime import Cluster

INTERVAL, TIMEOUT = 0.5, 3.0  # as test_runtime_liveness's worker stopped between calls


class ShortHeartbeatCluster(Cluster):
    """A Cluster whose heartbeat bound is TIMEOUT seconds, unless the caller gives one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("heartbeat_interval", INTERVAL)
        kwargs.setdefault("heartbeat_timeout", TIMEOUT)
        super().__init__(*args, **kwargs)


def use_short_heartbeat(monkeypatch):
    """Every cluster `ringpipe train` starts in this process, for the rest of the test."""
    monkeypatch.setattr(distributed_train, "Cluster", ShortHeartbeatCluster)


if __name__ == "__main__":
    from ringpipe.cluster.cli import main

    distributed_train.Cluster = ShortHeartbeatCluster
    main(prog_name="ringpipe")

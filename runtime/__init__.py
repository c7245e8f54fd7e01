"""ringpipe's actor runtime: ZeroMQ worker processes, communicators and collectives.

Imports nothing from the rest of ringpipe.
"""
from runtime.cluster import ActorGroup, CallFuture, Cluster, RemoteError, WorkerDied
from runtime.communicator import CommConfig, Communicator
from runtime.engine import Aborted, Cancelled, CollectiveMismatch, CommError, CommTimeout, Handle

__all__ = ["Cluster", "RemoteError", "WorkerDied", "CallFuture", "ActorGroup", "Communicator", "CommConfig",
           "Handle", "CommError", "CommTimeout", "CollectiveMismatch", "Aborted", "Cancelled"]

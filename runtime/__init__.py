"""ringpipe's actor runtime: ZeroMQ worker processes, communicators and collectives.

Imports nothing from the rest of ringpipe.
"""
from runtime.calls import (ActorGroup, CallFuture, ClusterStopped, RemoteError, WorkerDied, WorkerLost, WorkerStuck,
                           WorkerUnresponsive)
from runtime.cluster import Cluster
from runtime.comm_interface import CommHandle, CommunicatorInterface
from runtime.communicator import CommConfig, Communicator
from runtime.operations import Aborted, Cancelled, CollectiveMismatch, CommError, CommTimeout, Handle
from runtime.launch import Launcher, LocalLauncher

__all__ = ["Cluster", "RemoteError", "WorkerLost", "WorkerDied", "WorkerUnresponsive", "WorkerStuck",
           "ClusterStopped", "CallFuture", "ActorGroup", "Communicator", "CommConfig", "CommunicatorInterface",
           "CommHandle", "Handle", "CommError", "CommTimeout", "CollectiveMismatch", "Aborted", "Cancelled",
           "Launcher", "LocalLauncher"]

"""ringpipe's actor runtime: ZeroMQ worker processes, communicators and collectives.

Imports nothing from the rest of ringpipe.
"""
from ringpipe.runtime.calls import (ActorGroup, CallFuture, ClusterStopped, RemoteError, WorkerDied, WorkerLost, WorkerStuck,
                           WorkerUnresponsive)
from ringpipe.runtime.cluster import Cluster
from ringpipe.runtime.comm_interface import CommHandle, CommunicatorInterface
from ringpipe.runtime.communicator import CommConfig, Communicator
from ringpipe.runtime.operations import (Aborted, Cancelled, CollectiveMismatch, CommError, CommTimeout, GroupDestroyed,
                                         GroupDestroyedByPeer, Handle)
from ringpipe.runtime.launch import Launcher, LocalLauncher

__all__ = ["Cluster", "RemoteError", "WorkerLost", "WorkerDied", "WorkerUnresponsive", "WorkerStuck",
           "ClusterStopped", "CallFuture", "ActorGroup", "Communicator", "CommConfig", "CommunicatorInterface",
           "CommHandle", "Handle", "CommError", "CommTimeout", "CollectiveMismatch", "Aborted", "Cancelled",
           "GroupDestroyed", "GroupDestroyedByPeer", "Launcher", "LocalLauncher"]

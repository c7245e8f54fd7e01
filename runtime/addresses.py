"""Network addresses as the runtime writes them: ZeroMQ `tcp://` addresses for IPv4 and IPv6 hosts.

An IPv6 address inside an endpoint needs brackets ("tcp://[::1]:5555"), and a ZeroMQ socket speaks
IPv6 only with the IPV6 option set; `dual_stack` sets it as the default of a context's sockets (they
still reach IPv4 addresses).
"""
from __future__ import annotations

import zmq


def bracketed(host: str) -> str:
    """`host` as it goes before ":PORT": an IPv6 address in brackets, anything else as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def tcp_address(host: str, port: int | None = None) -> str:
    """"tcp://HOST" (for bind_to_random_port) or "tcp://HOST:PORT", IPv6 hosts bracketed."""
    return f"tcp://{bracketed(host)}" + (f":{port}" if port is not None else "")


def dual_stack(context: zmq.Context) -> zmq.Context:
    """`context`, whose sockets from now on may bind and connect to IPv6 addresses as well as IPv4."""
    context.setsockopt(zmq.IPV6, 1)
    return context

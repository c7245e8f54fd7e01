"""The agent's end of a run across hosts: join the driver's rendezvous, start this host's workers,
report on them, stop them when told or when the driver goes silent (see runtime/rendezvous.py).

The agent never forms a world on its own: without the driver's answer within `timeout` seconds it
fails naming the address, and it starts workers only from the bootstrap records the driver sent.
"""
from __future__ import annotations

import os
import secrets
import sys
import threading
import time

import msgpack
import zmq

from ringpipe.runtime.addresses import dual_stack, tcp_address
from ringpipe.runtime.auth import JobKeys
from ringpipe.runtime.launch import LocalLauncher
from ringpipe.runtime.rendezvous import (AGENT_SILENCE_S, RendezvousError, outward_address, package_version,
                                         parse_endpoint, resolve_host)

STATUS_INTERVAL_S = 0.5


def join_and_run(endpoint: str, keys: JobKeys, slots: int, *, host: str | None = None, ranks: list | None = None,
                 timeout: float = 60.0, silence: float = AGENT_SILENCE_S, say=lambda message: None,
                 driver_gone: threading.Event | None = None) -> int:
    """Join the rendezvous at `endpoint` ("HOST:PORT") holding `keys`, run the `slots` workers the
    driver sends (global `ranks` if the launcher fixed them: mpirun, srun), and return 0 if every
    one ended with 0 (else 1). `host` names this host (default: its address towards the driver).
    A driver silent for `silence` seconds is taken for dead, and so is one whose launcher sets
    `driver_gone` (the ssh connection or srun's input ended): the workers are stopped.
    RendezvousError if the driver does not answer within `timeout` seconds or refuses."""
    name, port = parse_endpoint(endpoint)
    driver = resolve_host(name, "rendezvous host")
    address = outward_address(driver)
    context = dual_stack(zmq.Context())
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"a" + secrets.token_bytes(8))
    dealer.setsockopt(zmq.LINGER, 1000)
    # A DEALER with no connection yet holds a send until one exists: to an unreachable (filtered,
    # down) endpoint that is forever, so every send gets the timeout too.
    dealer.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
    keys.make_client(dealer)
    dealer.connect(tcp_address(driver, port))
    launcher = None
    try:
        send = lambda message: dealer.send(msgpack.packb(message, use_bin_type=True))  # noqa: E731
        try:
            send({"t": "join", "host": host or address, "address": address, "slots": slots, "ranks": ranks,
                  "version": package_version(), "pid": os.getpid()})
        except zmq.Again:
            raise RendezvousError(f"cannot reach the rendezvous at {endpoint} within {timeout:g}s (nothing "
                                  "listens there, or it is unreachable)") from None
        reply = _receive(dealer, timeout)
        if reply is None:
            raise RendezvousError(f"no answer from the rendezvous at {endpoint} within {timeout:g}s (nothing "
                                  "listens there, it is unreachable, or this key is not the driver's)")
        if reply.get("t") == "refuse":
            raise RendezvousError(f"the rendezvous at {endpoint} refused this agent: {reply.get('reason')}")
        say(f"joined the rendezvous at {endpoint} as host {host or address}; waiting for the job to start")
        launcher, ours = _serve(dealer, send, endpoint, host or address, silence, driver_gone or threading.Event())
        codes = [launcher.poll(index) for index in range(len(ours))] if launcher else [1]
        return 0 if codes and all(code == 0 for code in codes) else 1
    finally:
        if launcher is not None:
            launcher.kill_all()
            for job_id in {boot["job_id"] for boot in launcher.boots}:
                launcher.clean_up(job_id)
        context.destroy(linger=1000)


def _receive(dealer, timeout: float) -> dict | None:
    if not dealer.poll(timeout * 1000):
        return None
    try:
        message = msgpack.unpackb(dealer.recv(), raw=False)
    except (ValueError, msgpack.ExtraData):
        return None
    return message if isinstance(message, dict) else None


def _serve(dealer, send, endpoint, host, silence, driver_gone):
    """Until the driver says stop (or falls silent, or is gone): start the workers, relay signals, report."""
    launcher, ours, heard, reported, last_report = None, [], time.monotonic(), None, 0.0
    while True:
        if driver_gone.is_set():
            if launcher is not None and any(launcher.poll(i) is None for i in range(len(ours))):
                sys.stderr.write(f"ringpipe agent: the connection to the driver at {endpoint} ended; stopping "
                                 "this host's workers\n")
            return launcher, ours
        message = _receive(dealer, 0.05)
        now = time.monotonic()
        if message is not None:
            heard = now
            kind = message.get("t")
            if kind == "start" and launcher is None:
                ours = [boot["rank"] for boot in message["boots"]]
                launcher = _AgentLauncher(host)
                launcher.start([_here(boot) for boot in message["boots"]], message.get("env") or {})
            elif kind == "signal" and launcher is not None and message.get("rank") in ours:
                launcher.send_signal(ours.index(message["rank"]), int(message["signum"]))
            elif kind == "stop":
                if launcher is not None:
                    launcher.kill_all(float(message.get("grace", 0.0)))
                    send(_status(launcher, ours))
                if message.get("bye") or launcher is None:
                    return launcher, ours
            elif kind == "refuse":
                raise RendezvousError(f"the rendezvous at {endpoint} refused this agent: {message.get('reason')}")
        elif now - heard > silence:
            sys.stderr.write(f"ringpipe agent: the driver at {endpoint} has been silent for {silence:g}s; "
                             "stopping this host's workers\n")
            return launcher, ours
        if launcher is not None:
            status = _status(launcher, ours)
            if status != reported or now - last_report > STATUS_INTERVAL_S:
                send(status)
                reported, last_report = status, now


def _status(launcher, ours) -> dict:
    """Each worker's exit code, pid and process note (" (its process is stopped ...)")."""
    return {"t": "status", "codes": {str(r): launcher.poll(i) for i, r in enumerate(ours)},
            "pids": {str(r): launcher.pid(i) for i, r in enumerate(ours)},
            "notes": {str(r): launcher.process_note(i) for i, r in enumerate(ours)}}


def _here(boot: dict) -> dict:
    """The driver's bootstrap record made to work on this host: this interpreter's import path
    first (the driver's may name folders this host lacks), the driver's folder if it exists here."""
    boot = dict(boot)
    boot["sys_path"] = list(dict.fromkeys([*sys.path, *boot["sys_path"]]))
    if not os.path.isdir(boot["cwd"]):
        boot["cwd"] = os.getcwd()
    return boot


class _AgentLauncher(LocalLauncher):
    """This host's workers; remembers their records so the agent can clean up after their jobs."""

    def start(self, boots: list[dict], env: dict | None = None) -> None:
        self.boots = boots
        super().start(boots, env)

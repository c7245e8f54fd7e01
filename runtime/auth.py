"""Job membership: every socket speaks CURVE with one key pair that only the job's processes hold.

The driver makes a fresh key pair per job and hands it to each worker over its stdin pipe (never
the command line or the environment). Servers run a ZAP handler that admits a client only if it
proved possession of the job's secret key, so another local process cannot join, send a message
that is acted on, or read what is sent.
"""
from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator


class JobKeys:
    def __init__(self, public: bytes, secret: bytes):
        self.public, self.secret = public, secret

    @classmethod
    def generate(cls) -> "JobKeys":
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def to_dict(self) -> dict:
        return {"public": self.public, "secret": self.secret}

    @classmethod
    def from_dict(cls, d: dict) -> "JobKeys":
        return cls(bytes(d["public"]), bytes(d["secret"]))

    def make_server(self, sock: zmq.Socket):
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.LINGER, 0)

    def make_client(self, sock: zmq.Socket):
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def start_authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """Run the ZAP handler for `context`: only clients holding this job's key pair get in."""
        auth = ThreadAuthenticator(context, log=_quiet_logger())
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_SameJob(self.public))
        return auth


class _SameJob:
    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain, client_key) -> bool:
        return client_key == self.public


def _quiet_logger():
    import logging

    logger = logging.getLogger("ringpipe.auth")
    logger.setLevel(logging.WARNING)
    return logger

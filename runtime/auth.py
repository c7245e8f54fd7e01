"""Job membership: every socket speaks CURVE with one key pair that only the job's processes hold.

The driver makes a fresh key pair per job and hands it to each worker over its stdin pipe (never
the command line or the environment). Servers run a ZAP handler that admits a client only if it
proved possession of the job's secret key, so another local process cannot join, send a message
that is acted on, or read what is sent.

Strangers can still open TCP connections to a listening port. Each costs a file descriptor until
ZeroMQ drops it, so every listening socket gets a short handshake deadline, and each process raises
its soft descriptor limit: a flood of idle connections cannot starve the run of descriptors.
"""
from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator

# A connection that has not completed the CURVE handshake within this many milliseconds is closed
# (ZeroMQ's default is 30 s). Our own peers finish it in milliseconds; a client whose handshake is
# cut short reconnects by itself.
HANDSHAKE_DEADLINE_MS = 2000


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
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_DEADLINE_MS)

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


def raise_descriptor_limit():
    """Raise this process's soft limit on open files to the hard limit, so that connections from
    strangers (each an accepted socket until its handshake deadline) cannot exhaust descriptors
    the run needs for its own files."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        target = min(target, 1 << 20)  # a sane ceiling: some code sizes tables by the limit
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed: keep the limit
        pass


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


class KeyFileError(ValueError):
    """A rendezvous key file that is missing, unreadable, malformed or readable by other users."""


def keys_from_secret(secret: bytes) -> JobKeys:
    """The key pair of a CURVE secret key (Z85, 40 characters): the public key follows from it."""
    secret = bytes(secret).strip()
    try:
        return JobKeys(zmq.curve_public(secret), secret)
    except (zmq.ZMQError, ValueError) as exc:
        raise KeyFileError(f"not a CURVE secret key (40 Z85 characters): {exc}") from None


def read_key_file(path: str) -> JobKeys:
    """The key pair in `path`, which must be readable by its owner only (mode 0600): whoever can
    read it can join the job."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                               f"run: chmod 600 {path}")
        with open(path, "rb") as f:
            secret = f.read()
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror}") from None
    try:
        return keys_from_secret(secret)
    except KeyFileError as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None


def create_key_file(path: str) -> JobKeys:
    """The key pair in `path`; a fresh one written there first (mode 0600, its folder 0700) if the
    file does not exist."""
    import os

    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(JobKeys.generate().secret + b"\n")
        os.replace(temporary, path)
    return read_key_file(path)

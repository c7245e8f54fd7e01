"""Host lists as launchers write them: hostfiles (`host slots=K`, the format OpenMPI, DeepSpeed and
Horovod share) and Slurm node lists (`node[01-04,07]`)."""
from __future__ import annotations

import re

_ENTRY = re.compile(r"^(?P<host>[^\s=#]+)(?:\s+slots\s*=\s*(?P<slots>\d+))?\s*$")


class HostfileError(ValueError):
    """A hostfile that cannot be read or parsed: names the file and the line."""


def parse_hostfile(text: str, path: str = "hostfile") -> list[tuple[str, int]]:
    """[(host, slots)] in the file's order. Each line is `host` or `host slots=K` (K >= 1; one
    slot if not given); `#` starts a comment; blank lines are skipped; a host listed twice gets
    the sum of its slots."""
    hosts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _ENTRY.match(line)
        if match is None or (match["slots"] is not None and int(match["slots"]) < 1):
            raise HostfileError(f"{path}:{number}: {line!r} is not 'HOST slots=K' with K >= 1")
        hosts[match["host"]] = hosts.get(match["host"], 0) + int(match["slots"] or 1)
    if not hosts:
        raise HostfileError(f"{path}: lists no host")
    return list(hosts.items())


def read_hostfile(path: str) -> list[tuple[str, int]]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise HostfileError(f"cannot read hostfile {path}: {exc.strerror}") from None
    return parse_hostfile(text, path)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list as host names: `node[01-04,07],gpu1` -> node01 ... node04,
    node07, gpu1 (zero padding kept). Uses python-hostlist, Slurm's own syntax."""
    import hostlist

    try:
        return hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise HostfileError(f"bad Slurm node list {nodelist!r}: {exc}") from None

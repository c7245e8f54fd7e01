"""Host lists as launchers write them: hostfiles (`host slots=K`, the format OpenMPI, DeepSpeed and
Horovod share) and Slurm node lists (`node[01-04,07]`)."""
from __future__ import annotations

import re

from ringpipe.runtime.placement import PlacementError, place_ranks

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


def hostfile_slots(path: str, world_size: int, tp: int, skip=()) -> tuple[list, list[int]]:
    """The hostfile's entries [(host, slots)] but the hosts in `skip` (gone, for a restart), and each
    rank's entry index (tensor-parallel groups inside a host when they can be); HostfileError naming
    the file if they cannot hold the run."""
    entries = [entry for entry in read_hostfile(path) if entry[0] not in skip]
    try:
        return entries, place_ranks([slots for _, slots in entries], world_size, tp)
    except PlacementError:
        raise HostfileError(f"{path}: {sum(s for _, s in entries)} slots on {len(entries)} hosts, "
                            f"too few for dp × tp × pp = {world_size} workers"
                            + (f" without {', '.join(sorted(skip))}" if skip else "")) from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list as host names: `node[01-04,07],gpu1` -> node01 ... node04,
    node07, gpu1; zero padding kept, several bracket groups multiply (`r[1-2]n[1-2]` -> r1n1, r1n2,
    r2n1, r2n2), as `scontrol show hostnames` prints them. HostfileError naming a malformed list.
    Our own parser: the package for it (python-hostlist) is GPL, and scontrol needs a Slurm config."""
    items, depth, current = [], 0, ""
    for char in nodelist:  # split at the commas outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise HostfileError(f"bad Slurm node list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    if depth or not all(items):
        raise HostfileError(f"bad Slurm node list {nodelist!r}: unbalanced brackets or an empty name")
    names = []
    for item in items:
        parts = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ..., text
        expanded = [parts[0]]
        for ranges, text in zip(parts[1::2], parts[2::2]):
            numbers = [number for span in ranges.split(",") for number in _span(span, nodelist)]
            expanded = [f"{head}{number}{text}" for head in expanded for number in numbers]
        names += expanded
    return names


def _span(span: str, nodelist: str) -> list[str]:
    """`01-04` -> 01, 02, 03, 04 (the first number's width kept); `7` -> 7."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", span)
    if not match or (match[2] is not None and int(match[2]) < int(match[1])):
        raise HostfileError(f"bad Slurm node list {nodelist!r}: {span!r} is not a number or a rising range")
    first, last = match[1], match[2] if match[2] is not None else match[1]
    return [str(number).zfill(len(first)) for number in range(int(first), int(last) + 1)]

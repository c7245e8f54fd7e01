"""A machine description for the planner: devices, peak FLOP/s, memory, links, and what
calibration measured on it. Stored as JSON (`ringpipe plan --calibrate` writes one for this machine;
model/planning/machines/ ships spec-sheet files for clusters one may not have).

    {"name": "...", "kind": "gpu" | "cpu", "devices_per_host": 8, "hosts": 1,
     "peak_flops": 989e12,            per device, FLOP/s of every dtype (cpu, calibrated files), or
     "peak_flops_by_dtype": {"float64": 67e12, "float32": 67e12, "tf32": 495e12,
                             "float16": 989e12, "bfloat16": 989e12},   per device, dense, by dtype
     "memory_bytes": 80e9,            per device
     "efficiency": 0.5,               fraction of peak the model's matmuls reach (spec files)
     "memory_bandwidth": 3.35e12,     bytes/s per device, for the elementwise passes
     "links": {"same_host":    {"latency": 3e-6, "bandwidth": 450e9},   s, bytes/s per device
               "across_hosts": {"latency": 8e-6, "bandwidth": 50e9}},
     "cores": 2,                      cpu: cores shared by the ranks of a host
     "calibration": {...}}            measured by --calibrate (see `Calibration`), optional

Collective times follow the ring algorithms: all-reduce 2(k−1)/k · n / bandwidth + 2(k−1) · latency,
all-gather / reduce-scatter half that; point-to-point latency + n / bandwidth. A calibrated machine
uses its measured (latency, seconds per byte) per operation and group size instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

MACHINES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "machines")
LINKS = ("same_host", "across_hosts")


@dataclass
class Link:
    latency: float  # seconds
    bandwidth: float  # bytes per second, per device

    def transfer(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass
class Machine:
    name: str
    kind: str = "cpu"
    devices_per_host: int = 1
    hosts: int = 1
    peak_flops: float | None = None  # one peak for every dtype; or peak_flops_by_dtype
    memory_bytes: float = 8e9
    efficiency: float = 1.0
    memory_bandwidth: float = 1e10
    links: dict = field(default_factory=dict)  # name -> Link
    # a GPU's peak differs by 16x between dtypes: a run is timed at its own dtype's entry
    peak_flops_by_dtype: dict | None = None  # dtype name -> FLOP/s per device
    cores: int | None = None
    calibration: dict | None = None  # see model/planning/calibration.py

    def __post_init__(self):
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"machine {self.name!r}: kind must be 'cpu' or 'gpu', got {self.kind!r}")
        for name in ("devices_per_host", "hosts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"machine {self.name!r}: {name} must be a positive integer, got "
                                 f"{getattr(self, name)!r}")
        if self.peak_flops is None and not self.peak_flops_by_dtype:
            raise ValueError(f"machine {self.name!r}: peak_flops (or peak_flops_by_dtype) is missing")
        numbers = [(name, getattr(self, name)) for name in ("peak_flops", "memory_bytes", "efficiency",
                                                             "memory_bandwidth") if getattr(self, name) is not None]
        numbers += [(f"peak_flops_by_dtype.{dtype}", value) for dtype, value in (self.peak_flops_by_dtype or {}).items()]
        for name, value in numbers:
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"machine {self.name!r}: {name} must be a positive number, got {value!r}")
        links = {}
        for name in LINKS:
            entry = self.links.get(name, self.links.get("same_host"))
            if entry is None:
                raise ValueError(f"machine {self.name!r}: links.same_host (latency, bandwidth) is missing")
            links[name] = entry if isinstance(entry, Link) else Link(float(entry["latency"]),
                                                                      float(entry["bandwidth"]))
        self.links = links

    @property
    def devices(self) -> int:
        return self.devices_per_host * self.hosts

    def to_dict(self) -> dict:
        data = asdict(self)
        data["links"] = {name: asdict(link) for name, link in self.links.items()}
        return data

    # ---- communication -----------------------------------------------------------------------------
    def link(self, across_hosts: bool) -> Link:
        return self.links["across_hosts" if across_hosts else "same_host"]

    def collective(self, op: str, nbytes: float, group: int, across_hosts: bool = False) -> float:
        """Seconds of one `op` ("all_reduce", "all_gather", "reduce_scatter") of `nbytes` (the whole
        tensor) over `group` ranks; 0 for a group of one."""
        if group <= 1 or nbytes <= 0:
            return 0.0
        measured = self._measured(op, group, across_hosts)
        if measured is not None:
            latency, per_byte = measured
            return latency + nbytes * per_byte
        link = self.link(across_hosts)
        steps = 2 * (group - 1) if op == "all_reduce" else group - 1
        return steps * (link.latency + nbytes / group / link.bandwidth)

    def point_to_point(self, nbytes: float, across_hosts: bool = False) -> float:
        measured = self._measured("send", 2, across_hosts)
        if measured is not None:
            return measured[0] + nbytes * measured[1]
        return self.link(across_hosts).transfer(nbytes)

    def _measured(self, op, group, across_hosts):
        if across_hosts or not self.calibration:
            return None
        table = self.calibration.get("communication", {}).get(op, {})
        if str(group) in table:
            return tuple(table[str(group)])
        if table:  # the largest group measured, scaled like a ring: per-byte time and latency grow with k−1
            k = max(int(g) for g in table)
            latency, per_byte = table[str(k)]
            return latency * (group - 1) / (k - 1), per_byte * (group - 1) / group * k / (k - 1)
        return None

    # ---- compute ----------------------------------------------------------------------------------
    def peak(self, dtype: str) -> float:
        """Peak FLOP/s per device of matmuls in `dtype` ("float64", "float32", "float16", ...);
        ValueError naming the machine when its file has peaks by dtype but not this one."""
        if not self.peak_flops_by_dtype:
            return self.peak_flops
        if dtype not in self.peak_flops_by_dtype:
            raise ValueError(f"machine {self.name!r}: no peak_flops_by_dtype entry for {dtype} "
                             f"(has {', '.join(sorted(self.peak_flops_by_dtype))})")
        return float(self.peak_flops_by_dtype[dtype])

    def compute_seconds(self, flops: float, elements: float = 0.0, dtype: str = "float32") -> float:
        """Seconds for `flops` of matmuls in `dtype` and elementwise passes over `elements` values,
        from the spec (the dtype's peak × efficiency, memory bandwidth: each element read and written)."""
        itemsize = np.dtype(dtype).itemsize
        return flops / (self.peak(dtype) * self.efficiency) + 2 * elements * itemsize / self.memory_bandwidth

    def oversubscription(self, ranks_per_host: int, background_load: float | None = None,
                         probe_ratio: float = 1.0) -> float:
        """How much slower each rank computes than calibration measured one process (cpu). The
        host's cores are shared by its ranks and whatever else runs: `background_load` runnable
        processes besides the ranks (None: as during calibration: its count of runnable tasks, or
        for an older file its load average less the calibrating process), and
        `probe_ratio` (a fixed probe's time now over its time at calibration) says how much slower a
        lone process is now than then."""
        if self.kind != "cpu" or not self.cores:
            return 1.0
        if background_load is None:
            calibration = self.calibration or {}
            background_load = calibration.get("background_load",
                                              max(0.0, calibration.get("load_average", 1.0) - 1.0))

        def contention(processes):  # a process's slowdown against a lone process on an idle host
            return max(1.0, (background_load + processes) / self.cores)

        return probe_ratio * contention(ranks_per_host) / contention(1)


def load_machine(path: str) -> Machine:
    """A `Machine` from a JSON file; a bare name finds a shipped file (e.g. "h100-8x-node")."""
    if not os.path.exists(path) and os.path.exists(os.path.join(MACHINES_DIR, path + ".json")):
        path = os.path.join(MACHINES_DIR, path + ".json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"machine file {path}: not found (shipped: {', '.join(shipped_machines())})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"machine file {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    known = set(Machine.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"machine file {path}: unknown field(s) {', '.join(unknown)}")
    if not isinstance(data, dict):
        raise ValueError(f"machine file {path}: not a JSON object of machine fields")
    missing = [name for name, f in Machine.__dataclass_fields__.items() if name not in data and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"machine file {path}: missing field(s) {', '.join(missing)}")
    try:
        return Machine(**data)
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"machine file {path}: {exc}") from None


def shipped_machines() -> list[str]:
    return sorted(name[:-5] for name in os.listdir(MACHINES_DIR) if name.endswith(".json"))


def default_machine_path() -> str:
    """Where `ringpipe plan --calibrate` stores this machine's file and `plan`/`train` look for it:
    $RINGPIPE_MACHINE, else machine.json in ringpipe's cache (RINGPIPE_CACHE or ~/.cache/ringpipe)."""
    from ringpipe.model.nn.kernels import cache_dir

    return os.environ.get("RINGPIPE_MACHINE") or str(cache_dir() / "machine.json")


def this_machine() -> Machine:
    """This host as a cpu machine: its cores and memory; the calibrated file when there is one,
    else nominal compute rates (the memory prediction needs none of them)."""
    path = default_machine_path()
    if os.path.exists(path):
        return load_machine(path)
    cores = os.cpu_count() or 1
    return Machine(name=f"this host ({cores} cores, uncalibrated)", kind="cpu", devices_per_host=cores,
                   peak_flops=1e11, memory_bytes=_host_memory(), efficiency=1.0, memory_bandwidth=5e9,
                   links={"same_host": {"latency": 1e-4, "bandwidth": 1e9}}, cores=cores)


def _host_memory() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9

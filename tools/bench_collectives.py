"""Collective benchmark in the style of nccl-tests, with torch.distributed's gloo side by side.

Each (op, size) is first run once on rank-dependent data and checked element by element (#wrong),
then timed: `iters` back-to-back calls after a barrier, time = the slowest rank's mean. Bus
bandwidth uses the nccl-tests factors: all_reduce 2(n-1)/n; all_gather and reduce_scatter (n-1)/n
with size = total bytes; broadcast and sendrecv 1.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from ringpipe.runtime.files import check_writable_file, write_json

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "sendrecv")
DTYPE = "float32"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {text!r}; use e.g. 1K, 64M, 4096")
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]


def parse_sizes(text: str, factor: int = 4) -> list[int]:
    """'1K-64M' (every factor-th power from 1K to 64M) or a comma list '1K,1M'."""
    if "-" in text:
        low, high = (parse_size(t) for t in text.split("-", 1))
        if low <= 0 or high < low:
            raise ValueError(f"bad size range {text!r}")
        sizes, size = [], low
        while size <= high:
            sizes.append(size)
            size *= factor
        return sizes
    return [parse_size(t) for t in text.split(",") if t.strip()]


def bus_factor(op: str, n: int) -> float:
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}.get(op, 1.0)


def iterations(size: int) -> int:
    # Enough repetitions for a stable mean, bounded so the largest sizes stay quick.
    return int(min(200, max(5, (256 << 20) // max(size, 1) // 16)))


# ---- one implementation-neutral measurement loop -----------------------------------------------
class Ops:
    """The five operations for one library; `array` makes its buffer type."""

    def __init__(self, rank, size, all_reduce, all_gather, reduce_scatter, broadcast, sendrecv, barrier, array):
        self.rank, self.size = rank, size
        self.all_reduce, self.all_gather, self.reduce_scatter = all_reduce, all_gather, reduce_scatter
        self.broadcast, self.sendrecv, self.barrier, self.array = broadcast, sendrecv, barrier, array


def measure(ops: Ops, op_names, sizes) -> list[dict]:
    n, rank = ops.size, ops.rank
    rows = []
    for op in op_names:
        for size in sizes:
            count = max(1, size // 4)
            if op in ("all_gather", "reduce_scatter"):
                count = max(n, count - count % n)
            run, check = _prepare(ops, op, count, n, rank)
            wrong = check(run())
            run_timed, _ = _prepare(ops, op, count, n, rank, timed=True)
            iters = iterations(size)
            run_timed()
            ops.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                run_timed()
            elapsed = (time.perf_counter() - start) / iters
            rows.append({"op": op, "size_bytes": count * 4, "count": count, "dtype": DTYPE, "time": elapsed,
                         "wrong": int(wrong)})
    return rows


def _prepare(ops: Ops, op, count, n, rank, timed=False):
    """(run, check) for one op: run() performs it once; check(result) counts wrong elements."""
    fill = 0.0 if timed else float(rank + 1)
    if op == "all_reduce":
        x = ops.array(np.full(count, fill, np.float32))
        return (lambda: ops.all_reduce(x)), (lambda r: np.count_nonzero(np.asarray(r) != n * (n + 1) / 2))
    if op == "all_gather":
        x = ops.array(np.full(count // n, fill, np.float32))
        expected = np.repeat(np.arange(1, n + 1, dtype=np.float32), count // n)
        return (lambda: ops.all_gather(x)), (lambda r: np.count_nonzero(np.asarray(r) != expected))
    if op == "reduce_scatter":
        x = ops.array(np.full(count, fill, np.float32))
        return (lambda: ops.reduce_scatter(x)), (lambda r: np.count_nonzero(np.asarray(r) != n * (n + 1) / 2))
    if op == "broadcast":
        x = ops.array(np.full(count, fill, np.float32))
        return (lambda: ops.broadcast(x)), (lambda r: np.count_nonzero(np.asarray(r) != 1.0))
    if op == "sendrecv":
        x = ops.array(np.full(count, fill, np.float32))
        out = ops.array(np.empty(count, np.float32))
        expected = float((rank - 1) % n + 1)
        return (lambda: ops.sendrecv(x, out)), (lambda r: np.count_nonzero(np.asarray(r) != expected))
    raise ValueError(f"unknown op {op!r}")


# ---- ringpipe ---------------------------------------------------------------------------------------
def ringpipe_worker(comm, op_names, sizes):
    def sendrecv(x, out):
        handle = comm.irecv((comm.rank - 1) % comm.size, out=out)
        comm.send(x, (comm.rank + 1) % comm.size)
        return handle.wait()

    ops = Ops(comm.rank, comm.size, comm.all_reduce, comm.all_gather, comm.reduce_scatter,
              lambda x: comm.broadcast(x, 0), sendrecv, comm.barrier, lambda a: a)
    return measure(ops, op_names, sizes)


def run_ringpipe(world_size, op_names, sizes, algorithm="auto") -> list[dict]:
    from ringpipe.runtime import Cluster

    with Cluster(world_size, threads_per_worker=1, algorithm=algorithm) as cluster:
        per_rank = cluster.run(ringpipe_worker, list(op_names), list(sizes))
    return _merge(per_rank, world_size, "ringpipe")


# ---- gloo (torch.distributed) ----------------------------------------------------------------------
def gloo_worker(rank, world_size, port, op_names, sizes, out_path):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    def all_gather(x):
        out = torch.empty(x.numel() * world_size, dtype=x.dtype)
        dist.all_gather_into_tensor(out, x)
        return out

    def reduce_scatter(x):
        out = torch.empty(x.numel() // world_size, dtype=x.dtype)
        dist.reduce_scatter_tensor(out, x)
        return out

    def sendrecv(x, out):
        ops = [dist.P2POp(dist.isend, x, (rank + 1) % world_size), dist.P2POp(dist.irecv, out, (rank - 1) % world_size)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        return out

    def all_reduce(x):
        dist.all_reduce(x)
        return x

    def broadcast(x):
        dist.broadcast(x, 0)
        return x

    ops = Ops(rank, world_size, all_reduce, all_gather, reduce_scatter, broadcast, sendrecv, dist.barrier,
              lambda a: torch.from_numpy(a))
    rows = measure(ops, op_names, sizes)
    write_json(f"{out_path}.{rank}", rows)
    dist.destroy_process_group()


def run_gloo(world_size, op_names, sizes, timeout=900) -> list[dict] | None:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or not dist.is_gloo_available():
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows")
        code = ("import sys, json; from ringpipe.tools.bench_collectives import gloo_worker; "
                "gloo_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), "
                "json.loads(sys.argv[5]), sys.argv[6])")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world_size), str(port),
                                   json.dumps(list(op_names)), json.dumps(list(sizes)), out_path], env=env)
                 for r in range(world_size)]
        try:
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"gloo benchmark failed (exit codes {[p.returncode for p in procs]})")
        per_rank = []
        for rank in range(world_size):
            with open(f"{out_path}.{rank}") as f:
                per_rank.append(json.load(f))
    return _merge(per_rank, world_size, "gloo")


def _merge(per_rank, world_size, impl) -> list[dict]:
    rows = []
    for parts in zip(*per_rank):
        first = parts[0]
        seconds = max(p["time"] for p in parts)
        algbw = first["size_bytes"] / seconds / 1e9
        rows.append({"op": first["op"], "size_bytes": first["size_bytes"], "count": first["count"],
                     "dtype": first["dtype"], "time_us": seconds * 1e6, "algbw": algbw,
                     "busbw": algbw * bus_factor(first["op"], world_size),
                     "wrong": sum(p["wrong"] for p in parts), "impl": impl})
    return rows


def format_table(rows: list[dict], gloo: list[dict] | None, world_size: int) -> str:
    head = f"{'op':>15} {'size(B)':>11} {'count':>10} {'dtype':>8} {'time(us)':>11} {'algbw':>8} {'busbw':>8} {'#wrong':>7}"
    if gloo:
        head += f" {'gloo(us)':>11} {'gloo bus':>9} {'speedup':>8}"
    lines = [f"# ringpipe collectives, {world_size} ranks, bandwidth in GB/s", head]
    by_key = {(g["op"], g["size_bytes"]): g for g in gloo or []}
    for row in rows:
        line = (f"{row['op']:>15} {row['size_bytes']:>11} {row['count']:>10} {row['dtype']:>8} "
                f"{row['time_us']:>11.1f} {row['algbw']:>8.3f} {row['busbw']:>8.3f} {row['wrong']:>7}")
        other = by_key.get((row["op"], row["size_bytes"]))
        if other:
            line += f" {other['time_us']:>11.1f} {other['busbw']:>9.3f} {other['time_us'] / row['time_us']:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(world_size=4, ops=OPS, sizes="1K-64M", compare=None, json_path=None, algorithm="auto", echo=print):
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    size_list = parse_sizes(sizes) if isinstance(sizes, str) else list(sizes)
    if json_path:
        check_writable_file(json_path)  # before the run, whose results would be lost at the end
    rows = run_ringpipe(world_size, ops, size_list, algorithm)
    gloo = None
    if compare == "gloo":
        gloo = run_gloo(world_size, ops, size_list)
        if gloo is None:
            echo("# --compare gloo: torch.distributed with gloo is not installed; skipped")
    echo(format_table(rows, gloo, world_size))
    if json_path:
        keys = ("op", "size_bytes", "time_us", "algbw", "busbw", "wrong", "impl")
        write_json(json_path, [{k: row[k] for k in keys} for row in rows + (gloo or [])], indent=1)
    return rows, gloo

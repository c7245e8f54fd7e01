"""`ringpipe plan --calibrate`: time this machine for the planner and store a machine file.

Compute: the model's own op pairs at the shapes a plan needs — a GPT-2 block's forward,
backward-input (also with recompute) and backward-weight, the head and the embedding, for every micro-batch row count
asked — with one BLAS thread, as a distributed worker runs them (runtime/cluster.py gives each worker
its share of the cores; ringpipe's training workers take one); the matmul rate, the elementwise
rate, and the seconds per parameter of the passes a step makes over whole gradients and weights
(zeroing, each micro-batch's accumulation, the norm, clipping and AdamW). Communication:
all-reduce, all-gather, reduce-scatter over groups of 2..N local workers and a point-to-point
send, each fitted as latency + seconds per byte from two sizes.

Per-byte rates are measured on arrays several times the last-level cache: a rank's gradients,
optimizer state and gradient buckets are that large, and a rate timed on data the cache holds
(a few MiB) would be the cache's, not memory's (measured here: a 4 MiB all-reduce fit priced a
dp-2 step's 113 MB of gradients at half what it took).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import statistics
import time

import numpy as np

from ringpipe.model.planning.machine import Machine, _host_memory

REPEATS = 5


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this host (sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 << 20)


def beyond_cache_bytes() -> int:
    """An array size whose per-byte cost is memory's: 4 × the last-level cache, within 16..256 MiB."""
    return min(max(4 * last_level_cache_bytes(), 16 << 20), 256 << 20)


SIZES = (1 << 16, beyond_cache_bytes())  # bytes: the latency and the bandwidth end of the fit


def background_load(samples: int = 20, interval: float = 0.02, path: str = "/proc/loadavg") -> float:
    """Runnable tasks on this host now, besides the caller: the kernel's count of running tasks (the
    fourth field of /proc/loadavg, "running/total", which counts the reader itself), averaged over
    `samples` readings `interval` seconds apart. Not the load average: it lags by a minute, so just
    after a cluster's workers end it still counts them as if they competed for the cores."""
    counts = []
    for k in range(samples):
        with open(path) as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        if k + 1 < samples:
            time.sleep(interval)
    return max(0.0, statistics.fmean(counts))


def _median_seconds(fn, repeats=REPEATS) -> float:
    fn()  # warm-up (page faults, kernel build, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(setup, fn, repeats=3) -> float:
    """Median seconds of fn(setup()) over `repeats` runs after one warm-up; setup is not timed."""
    times = []
    for k in range(repeats + 1):
        argument = setup()
        start = time.perf_counter()
        fn(argument)
        if k:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_seconds() -> float:
    """A fixed single-threaded workload (matmuls and elementwise passes of a 256 × 768 activation):
    its time now against its time at calibration says how much of a core a process gets now."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 768)).astype(np.float32)
    w = rng.standard_normal((768, 768)).astype(np.float32)

    def work():
        y = x
        for _ in range(8):
            y = np.tanh(y @ w * 0.03)

    with threadpool_limits(1):
        return _median_seconds(work, repeats=7)


def _fit(small: float, large: float) -> list:
    """[latency s, seconds per byte] through the two measured sizes."""
    per_byte = max((large - small) / (SIZES[1] - SIZES[0]), 0.0)
    return [max(small - per_byte * SIZES[0], 0.0), per_byte]


def time_collectives(comm) -> dict:
    """Run on every rank of a local cluster: {op: [latency, s/byte]} for this group size."""
    result = {}
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        times = []
        for nbytes in SIZES:
            x = np.ones(nbytes // 4, np.float32)
            call = {"all_reduce": lambda: comm.all_reduce(x), "all_gather": lambda: comm.all_gather(x),
                    "reduce_scatter": lambda: comm.reduce_scatter(x)}[op]
            comm.barrier()
            times.append(_median_seconds(call))
        result[op] = _fit(*times)
    if comm.size >= 2 and comm.rank < 2:
        times = []
        for nbytes in SIZES:
            x = np.ones(nbytes // 4, np.float32)
            peer = 1 - comm.rank

            def ping_pong():
                if comm.rank == 0:
                    comm.send(x, peer)
                    comm.recv(peer)
                else:
                    comm.recv(peer)
                    comm.send(x, peer)

            times.append(_median_seconds(ping_pong) / 2)
        result["send"] = _fit(*times)
    else:
        comm.barrier()
    return result


def calibrate_communication(group_sizes) -> dict:
    from ringpipe.runtime.testing import run_local

    table = {}
    for k in sorted(set(group_sizes)):
        if k < 2:
            continue
        per_rank = run_local(time_collectives, k)
        for op in per_rank[0]:
            fits = [r[op] for r in per_rank if op in r]
            table.setdefault(op, {})[str(k)] = [max(f[0] for f in fits), max(f[1] for f in fits)]
    return table


def _piece_seconds(config, rows, seed) -> dict:
    """{"block|B": {forward, backward_input, backward_weight, backward_input_recompute}, "head|B",
    "embedding|B"} of a dense GPT-2 of `config` (one BLAS thread: the caller's limit)."""
    from ringpipe.model.gpt2.model import GPT

    pieces = {}
    model = GPT(config, seed=seed)
    recomputing = GPT(dataclasses.replace(config, recompute=True), params=model.params)
    T, C = config.block_size, config.n_embd
    rng = np.random.default_rng(seed)
    for B in sorted(set(rows)):
        idx = rng.integers(0, config.vocab_size, (B, T))
        x = rng.standard_normal((B, T, C)).astype(model.dtype)
        dout = rng.standard_normal((B, T, C)).astype(model.dtype)
        # each part timed alone, its inputs made fresh (untimed) before every repeat
        block = {"forward": _timed(lambda: x, lambda x: model.memory.release(model.block_forward(0, x)[1])),
                 "backward_input": _timed(lambda: model.block_forward(0, x)[1],
                                          lambda cache: model.block_backward_input(0, cache, dout)),
                 "backward_weight": _timed(
                     lambda: model.block_backward_input(0, model.block_forward(0, x)[1], dout)[1],
                     model.block_backward_weight)}
        # with recompute the backward rebuilds the caches its own way (dense: the attention half twice)
        block["backward_input_recompute"] = _timed(
            lambda: recomputing.block_forward(0, x)[1], lambda cache: recomputing.block_backward_input(0, cache, dout))
        head = {"forward": _timed(lambda: x, lambda x: model.memory.release(model.head_forward(x, idx)[1])),
                "backward_input": _timed(lambda: model.head_forward(x, idx)[1], model.head_backward),
                "backward_weight": 0.0}
        embedding = {"forward": _timed(lambda: idx, lambda i: model.memory.release(model.embedding_forward(i)[1])),
                     "backward_input": _timed(lambda: model.embedding_forward(idx)[1],
                                              lambda cache: model.embedding_backward(cache, x)),
                     "backward_weight": 0.0}
        pieces.update({f"block|{B}": block, f"head|{B}": head, f"embedding|{B}": embedding})
    return pieces


def step_pass_seconds(dtype, elements: int | None = None) -> dict:
    """Seconds per element of the passes a training step makes over a rank's whole gradients and
    weights (model/training/parallel_trainer.py), on arrays of `elements` (default: beyond the
    cache): "zero" (the flat gradient, once per step), "accumulate" (`grad += g`, once per piece per
    micro-batch: model/parallel/stage.py), "optimizer" (the gradient norm, clipping, AdamW)."""
    from ringpipe.model.nn.optim import AdamW

    dtype = np.dtype(dtype)
    n = elements or beyond_cache_bytes() // dtype.itemsize
    params, grads = {"w": np.zeros(n, dtype)}, {"w": np.full(n, 1e-3, dtype)}
    contribution = np.full(n, 1e-3, dtype)
    optimizer = AdamW(params, weight_decay=0.1)

    def optimizer_pass():
        norm = float(np.sqrt(np.vdot(grads["w"], grads["w"])))
        grads["w"] *= 1.0 / max(norm, 1.0)
        optimizer.update(params, grads, 1e-3)

    passes = {"zero": lambda: grads["w"].fill(0), "accumulate": lambda: np.add(grads["w"], contribution, out=grads["w"]),
              "optimizer": optimizer_pass}
    return {name: _median_seconds(fn) / n for name, fn in passes.items()}


def calibrate_compute(config, rows: list[int], seed: int = 0, pieces: bool = True) -> dict:
    """Seconds of each piece of a dense GPT-2 of `config` per micro-batch of each row count (none with
    `pieces` False: another family's steps are then modelled from the rates measured here), the
    step's per-element passes (`step_pass_seconds`: "optimizer_seconds_per_element" and
    "gradient_pass_seconds" {zero, accumulate}), the matmul and elementwise rates."""
    from threadpoolctl import threadpool_limits

    timed = {}
    dtype = np.dtype(config.dtype)
    with threadpool_limits(1):
        if pieces:
            timed = _piece_seconds(config, rows, seed)
        passes = step_pass_seconds(dtype)
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((1024, 1024)).astype(dtype)
        b = rng.standard_normal((1024, 1024)).astype(dtype)
        matmul = 2 * 1024 ** 3 / _median_seconds(lambda: a @ b)
        big = np.ones(beyond_cache_bytes() // dtype.itemsize, dtype)
        elementwise = 2 * big.nbytes / _median_seconds(lambda: np.multiply(big, 0.5, out=big))
    return {"pieces": timed, "optimizer_seconds_per_element": passes["optimizer"],
            "gradient_pass_seconds": {"zero": passes["zero"], "accumulate": passes["accumulate"]},
            "matmul_flops": matmul, "elementwise_bytes_per_second": elementwise}


def calibrate(inventory, rows: list[int], group_sizes: list[int], progress=print) -> Machine:
    """This host as a calibrated `Machine` for `inventory`'s model."""
    from ringpipe.model.planning.step_time import architecture_key

    cores = os.cpu_count() or 1
    progress(f"timing the model's pieces at micro-batch rows {sorted(set(rows))} ...")
    # the pieces are timed on GPT-2's dense model; another family is modelled from the rates
    compute = calibrate_compute(inventory.config, rows, pieces=inventory.family == "gpt2")
    compute["model"] = architecture_key(inventory)
    progress(f"timing collectives over {sorted(set(g for g in group_sizes if g > 1))} local workers ...")
    communication = calibrate_communication(group_sizes)
    send = communication.get("send", {}).get("2", [1e-4, 1e-9])
    return Machine(name=f"this host ({cores} cores, calibrated)", kind="cpu", devices_per_host=cores,
                   peak_flops=compute["matmul_flops"], memory_bytes=_host_memory(), efficiency=1.0,
                   memory_bandwidth=compute["elementwise_bytes_per_second"],
                   links={"same_host": {"latency": send[0], "bandwidth": 1.0 / max(send[1], 1e-12)}}, cores=cores,
                   calibration={"compute": compute, "communication": communication,
                                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "load_average": os.getloadavg()[0], "background_load": background_load(),
                                "probe_seconds": probe_seconds()})

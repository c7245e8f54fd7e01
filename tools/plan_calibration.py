"""`ringpipe plan --calibrate`: time this machine for the planner and store a machine file.

Compute: the model's own pieces at the shapes a plan needs, through its family's parallel plan
(GPT-2, BERT, T5 alike) — a block's forward, backward-input (also with recompute, where the family
has it) and backward-weight, the head and the embedding, for every micro-batch row count asked —
with one BLAS thread, as a distributed worker runs them (runtime/cluster.py gives each worker
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


def _piece_seconds(inventory, rows, seed) -> dict:
    """{"block|B": {forward, backward_input, backward_weight[, backward_input_recompute]}, "head|B",
    "embedding|B"} of `inventory`'s model, timed through its parallel plan's stage pieces (the code
    a training rank runs: model/parallel/stage.py) on one stage holding the whole model, dense.
    A block is the mean of the plan's blocks where they differ (T5's encoder and decoder layers)."""
    from ringpipe.model.parallel.stage import Stage

    plan = inventory.plan
    params = plan.init_params(seed)
    stage = Stage(plan, params, range(plan.num_layers), True, True)
    recomputing = (Stage(type(plan)(dataclasses.replace(plan.config, recompute=True)), params,
                         range(plan.num_layers), True, True) if inventory.recompute else None)
    del params
    pieces, release = stage.pieces, stage.memory.release
    blocks = range(plan.num_layers) if not getattr(inventory, "uniform_layers", True) else range(1)
    rng = np.random.default_rng(seed)
    timed = {}
    for B in sorted(set(rows)):
        idx, targets = inventory.sample_batch(B, rng)
        x, cache = pieces.embedding_forward(idx, None)
        release(cache)
        inputs = []  # each timed block's input, as the blocks before it make it
        for i in blocks:
            inputs.append(x)
            x, cache = pieces.block_forward(i, x, None)
            release(cache)
        dout = rng.standard_normal(x.shape).astype(x.dtype)

        def block_times(i, x):
            def deferred():
                return pieces.block_backward_input(i, pieces.block_forward(i, x, None)[1], dout)[1]
            times = {"forward": _timed(lambda: x, lambda x: release(pieces.block_forward(i, x, None)[1])),
                     "backward_input": _timed(lambda: pieces.block_forward(i, x, None)[1],
                                              lambda cache: pieces.block_backward_input(i, cache, dout)),
                     "backward_weight": _timed(deferred, pieces.block_backward_weight)}
            if recomputing is not None:  # the backward rebuilds the caches its own way
                rebuild = recomputing.pieces
                times["backward_input_recompute"] = _timed(lambda: rebuild.block_forward(i, x, None)[1],
                                                           lambda cache: rebuild.block_backward_input(i, cache, dout))
            return times

        per_block = [block_times(i, inputs[k]) for k, i in enumerate(blocks)]
        timed[f"block|{B}"] = {kind: statistics.fmean(t[kind] for t in per_block) for kind in per_block[0]}
        timed[f"head|{B}"] = {
            "forward": _timed(lambda: x, lambda x: release(pieces.head_forward(x, targets)[1])),
            "backward_input": _timed(lambda: pieces.head_forward(x, targets)[1],
                                     lambda cache: pieces.head_backward(cache, 1.0)),
            "backward_weight": 0.0}
        timed[f"embedding|{B}"] = {
            "forward": _timed(lambda: idx, lambda i: release(pieces.embedding_forward(i, None)[1])),
            "backward_input": _timed(lambda: pieces.embedding_forward(idx, None)[1],
                                     lambda cache: pieces.embedding_backward(cache, inputs[0])),
            "backward_weight": 0.0}
    return timed


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


def calibrate_compute(inventory, rows: list[int], seed: int = 0) -> dict:
    """Seconds of each piece of `inventory`'s model per micro-batch of each row count
    (`_piece_seconds`), the step's per-element passes (`step_pass_seconds`:
    "optimizer_seconds_per_element" and "gradient_pass_seconds" {zero, accumulate}), the matmul and
    elementwise rates."""
    from threadpoolctl import threadpool_limits

    dtype = np.dtype(inventory.config.dtype)
    with threadpool_limits(1):
        timed = _piece_seconds(inventory, rows, seed)
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
    compute = calibrate_compute(inventory, rows)
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

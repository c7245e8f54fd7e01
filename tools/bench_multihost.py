"""Across hosts: all_reduce bus bandwidth and data-parallel overlap on shaped links.

Each setup is N network-namespace hosts (tools/namespace_hosts.py) whose links are shaped with
`tc tbf` to a rate in both directions, one rank per host, joined through the rendezvous as
`ringpipe worker` agents would be (started inside each namespace; CURVE on every socket, as on
real hosts). Per round and setup:

    all_reduce   `iterations` back-to-back float32 all_reduces of `size` bytes after a barrier;
                 busbw = 2(n-1)/n × size / time (nccl-tests), compared with the shaped rate;
                 cpu = CPU seconds of all ranks together per all_reduce (CURVE's encryption
                 and ZeroMQ's copies are most of it). Outside load cannot inflate it: with
                 `cores` cores, cpu / min(cores, n) is the shortest time this machine allows.
    dp step      the data-parallel `ParallelTrainer` for `steps` steps, gradients in buckets of
                 `bucket_bytes` reduced while backward runs. Per step, the rank that finished
                 backward last sets the pace: its overlapped (first bucket launched -> end of
                 backward) and exposed (end of backward -> every bucket reduced) times give
                 hidden = overlapped / (overlapped + exposed). Ranks done earlier also wait for
                 it; that wait is load imbalance, not communication (`waiting ms`: the ranks'
                 mean exposed time, which includes it). The model and batch are chosen so that
                 backward is longer than the gradients' ring transfer at the slowest link (the
                 `link ms` column: 2(n-1)/n × gradient bytes / rate).

Setups take turns in every round (interleaved); each number is the median over rounds.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.run_dir import TOKEN_FILE
from ringpipe.model.training.trainer import Trainer
from ringpipe.runtime import Cluster
from ringpipe.runtime.auth import JobKeys
from ringpipe.runtime.files import write_text
from ringpipe.runtime.launch import reaching_this_package
from ringpipe.runtime.rendezvous import Rendezvous, RendezvousLauncher
from ringpipe.tools.bench_data_parallel import CORPUS
from ringpipe.tools.namespace_hosts import NamespaceHosts

RATES_BITS = {"1gbit": 1e9, "200mbit": 200e6}


def all_reduce_seconds(comm, size: int, iterations: int, warm: bool = True) -> tuple[float, float]:
    """This rank's mean (seconds, CPU seconds of this process) per all_reduce of `size` bytes of
    float32, after one untimed (`warm`: connections, buffers; once per setup is enough)."""
    x = np.ones(size // 4, np.float32)
    if warm:
        comm.all_reduce(x)
    comm.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        comm.all_reduce(x)
    return (time.perf_counter() - start) / iterations, (time.process_time() - cpu) / iterations


def dp_steps(trainers, steps: range) -> dict:
    """Medians over `steps` of the step time (slowest rank) and the pace-setting rank's overlapped
    and exposed all-reduce times, and of all ranks' mean exposed time (seconds)."""
    rows = []
    for step in steps:
        metrics = trainers.train_step(step).result()
        timings = [m["data_parallel"] for m in metrics]
        last = min(timings, key=lambda t: t["exposed_s"])  # finished backward last: nothing to wait for
        rows.append((max(m["seconds"] for m in metrics), last["overlapped_s"], last["exposed_s"],
                     statistics.mean(t["exposed_s"] for t in timings)))
    step_s, overlapped, exposed, waiting = (statistics.median(column) for column in zip(*rows))
    return {"step_s": step_s, "overlapped_s": overlapped, "exposed_s": exposed, "waiting_s": waiting,
            "hidden": overlapped / (overlapped + exposed)}


class ShapedHosts:
    """`count` namespace hosts at `rate`, one worker each, as a running Cluster (`.cluster`)."""

    def __init__(self, count: int, rate: str, timeout: float = 600.0):
        self.hosts = NamespaceHosts(count, rate=rate).__enter__()
        self.agents: list[subprocess.Popen] = []
        try:
            keys = JobKeys.generate()
            rendezvous = Rendezvous(self.hosts.gateway, 0, keys)
            env = reaching_this_package(dict(os.environ))
            for index in range(count):
                agent = subprocess.Popen(["ip", "netns", "exec", self.hosts.namespaces[index], sys.executable, "-m",
                                          "ringpipe.cluster", "worker", "--rdzv-endpoint", rendezvous.endpoint,
                                          "--key-stdin", "--host-id", f"host{index}"],
                                         stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
                agent.stdin.write(keys.secret + b"\n")
                agent.stdin.close()
                self.agents.append(agent)
            agents = sorted(rendezvous.gather(count, 0, 60.0), key=lambda agent: agent.host)
            launcher = RendezvousLauncher(rendezvous, agents, list(range(count)))
            launcher.starters = self.agents
            self.cluster = Cluster(count, launcher=launcher, bind_host=self.hosts.gateway, timeout=timeout,
                                   threads_per_worker=1)
        except BaseException:
            self.close()
            raise

    def close(self):
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.close()
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
        self.hosts.close()


def run(host_counts=(2, 3), rates=("1gbit", "200mbit"), size: int = 64 << 20, iterations: int = 2,
        rounds: int = 5, steps: int = 3, n_layer: int = 4, n_embd: int = 128, block_size: int = 64,
        batch_per_rank: int = 48, bucket_bytes: int = 256 << 10) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        write_text(corpus, CORPUS)
        base = TrainConfig(data=corpus, n_layer=n_layer, n_head=4, n_embd=n_embd, block_size=block_size,
                           batch_size=batch_per_rank, steps=10 ** 6, warmup=10, dtype="float32")
        driver = Trainer.create(base, os.path.join(tmp, "run"))
        token_file = os.path.join(tmp, "run", TOKEN_FILE)
        setups, samples = [], {}
        try:
            for count in host_counts:
                for rate in rates:
                    shaped = ShapedHosts(count, rate)
                    setups.append((count, rate, shaped))
                    config = dataclasses.replace(base, batch_size=batch_per_rank * count)
                    shaped.trainers = shaped.cluster.spawn(ParallelTrainer, dataclasses.asdict(config),
                                                           dataclasses.asdict(Layout(dp=count)), token_file,
                                                           driver.tokenizer.vocab_size, bucket_bytes)
                    dp_steps(shaped.trainers, range(2))  # warm-up steps
                    shaped.cluster.run(all_reduce_seconds, size, 1)  # and a warm-up all_reduce
            next_step = 2
            for _ in range(rounds):  # interleaved: outside load hits every setup alike
                for count, rate, shaped in setups:
                    timed = shaped.cluster.run(all_reduce_seconds, size, iterations, False)
                    seconds, cpu = max(s for s, _ in timed), sum(c for _, c in timed)
                    dp = dp_steps(shaped.trainers, range(next_step, next_step + steps))
                    samples.setdefault((count, rate), []).append((seconds, cpu, dp))
                next_step += steps
        finally:
            for _, _, shaped in setups:
                shaped.close()
    gradient_bytes = int(sum(p.size for p in driver.gpt.params.values())) * 4
    rows = []
    for (count, rate), got in samples.items():
        seconds = statistics.median(s for s, _, _ in got)
        busbw = 2 * (count - 1) / count * size / seconds
        dps = [dp for _, _, dp in got]
        rows.append({"hosts": count, "rate": rate, "all_reduce_s": seconds, "busbw_bytes_s": busbw,
                     "of_rate": busbw * 8 / RATES_BITS[rate], "cpu_s": statistics.median(c for _, c, _ in got),
                     "link_s": 2 * (count - 1) / count * gradient_bytes * 8 / RATES_BITS[rate],
                     "step_s": statistics.median(dp["step_s"] for dp in dps),
                     "overlapped_s": statistics.median(dp["overlapped_s"] for dp in dps),
                     "exposed_s": statistics.median(dp["exposed_s"] for dp in dps),
                     "waiting_s": statistics.median(dp["waiting_s"] for dp in dps),
                     "hidden": statistics.median(dp["hidden"] for dp in dps)})
    return {"size": size, "iterations": iterations, "rounds": rounds, "steps": steps, "cores": os.cpu_count(),
            "model": {"n_layer": n_layer, "n_embd": n_embd, "block_size": block_size,
                      "batch_per_rank": batch_per_rank, "bucket_bytes": bucket_bytes},
            "gradient_bytes": gradient_bytes, "rows": rows, "load_average": os.getloadavg()}


def format_table(result: dict) -> str:
    model = result["model"]
    lines = [f"all_reduce of {result['size'] >> 20} MiB float32 ({result['iterations']} per round); dp step of GPT "
             f"{model['n_layer']}L×{model['n_embd']}, {model['batch_per_rank']}×{model['block_size']} tokens per rank, "
             f"{result['gradient_bytes'] / 2 ** 20:.1f} MiB of gradients in buckets ≤ {model['bucket_bytes'] >> 10} KiB; "
             f"median of {result['rounds']} interleaved rounds; {result['cores']} cores, load average "
             f"{result['load_average'][0]:.2f}",
             f"{'hosts':>5} {'link':>8} {'all_reduce s':>13} {'busbw MB/s':>11} {'of link':>8} {'cpu s':>6} "
             f"{'step ms':>8} {'link ms':>8} {'overlapped ms':>14} {'exposed ms':>11} {'hidden':>7} "
             f"{'waiting ms':>11}"]
    for row in result["rows"]:
        lines.append(f"{row['hosts']:>5} {row['rate']:>8} {row['all_reduce_s']:>13.3f} "
                     f"{row['busbw_bytes_s'] / 1e6:>11.1f} {row['of_rate']:>8.0%} {row['cpu_s']:>6.2f} "
                     f"{row['step_s'] * 1e3:>8.1f} {row['link_s'] * 1e3:>8.1f} {row['overlapped_s'] * 1e3:>14.1f} "
                     f"{row['exposed_s'] * 1e3:>11.1f} {row['hidden']:>7.0%} {row['waiting_s'] * 1e3:>11.1f}")
    return "\n".join(lines)

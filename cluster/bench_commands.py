"""`ringpipe bench ...` subcommands; the benchmark code itself lives in tools/."""
from __future__ import annotations

import click

from ringpipe.cluster.options import (SEED, ByteSizes, CommaList, FiniteFloat, OutputDirectory, OutputFile, bad_flag,
                                      usage_error)
from ringpipe.model.data.dataset import SAMPLERS as _SAMPLERS
from ringpipe.model.nn.mixed_precision import DTYPES
from ringpipe.model.parallel.pipeline_parallel.schedules import SCHEDULES as _SCHEDULES
from ringpipe.runtime import RemoteError, WorkerLost
from ringpipe.runtime.files import write_json
from ringpipe.runtime.memory_cgroup import WorkerKilled
from ringpipe.tools.bench_collectives import OPS as _COLLECTIVE_OPS

# A worker that fails, dies, stops or hangs ends a benchmark with its one-line error, as a bad flag does.
_ONE_LINE_ERRORS = (ValueError, RemoteError, WorkerLost, WorkerKilled)


def _shape_options(**defaults):
    """The model-shape flags of a benchmark, one `--n-layer`-style flag per keyword (`n_layer=4`:
    its default), each a positive integer with its default shown, in the keywords' order in
    `--help`."""
    def add(command):
        for name, default in reversed(defaults.items()):  # click lists the last option added first
            command = click.option(f"--{name.replace('_', '-')}", default=default, show_default=True,
                                   type=click.IntRange(min=1))(command)
        return command
    return add


@click.group(short_help="Benchmarks: tables on the terminal, --json for the details.")
def bench():
    """Benchmarks (nccl-tests style tables, --json output)."""


def _first_line(exc: Exception) -> click.ClickException:
    """A flag's ValueError as it is, a usage error (exit 2); a worker's error without its remote
    traceback (exit 1)."""
    if isinstance(exc, ValueError):
        return usage_error(str(exc) or type(exc).__name__)
    return click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _run_and_report(run, format_result, json_path):
    """Run a benchmark (`run()`; a ValueError is the one-line CLI error), print its table, write its
    result as JSON when asked, and return it."""
    try:
        result = run()
    except _ONE_LINE_ERRORS as exc:
        raise _first_line(exc) from None
    click.echo(format_result(result))
    if json_path:
        write_json(json_path, result, indent=1)
    return result


@bench.command("model", short_help="Training tokens/s: ringpipe vs transformers.")
@_shape_options(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65)
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1),
              help="Timed steps (after 3 warmup).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="ringpipe: batch shards on threads; PyTorch: torch.set_num_threads.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--no-compare", is_flag=True, help="Skip the PyTorch/transformers run.")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_model(n_layer, n_head, n_embd, block_size, batch_size, vocab_size, steps, threads,
                dtype, no_compare, json_path):
    """Training-step tokens/s of the dense GPT vs transformers' GPT2LMHeadModel on CPU."""
    from ringpipe.tools.bench_model import format_table, run

    _run_and_report(lambda: run(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                batch_size=batch_size, vocab_size=vocab_size, steps=steps,
                                threads=threads, dtype=dtype, compare=not no_compare),
                    format_table, json_path)


_COMPARE_HELP = ("Also run these libraries in the same run, interleaved round by round: none, gloo "
                 "(torch.distributed, needs torch), mpi (OpenMPI through mpi4py, needs mpirun), or gloo,mpi.")
_ROUNDS_HELP = "Interleaved rounds (ringpipe, peer, ringpipe, peer, ...); every figure is their median."


@bench.command("collectives", short_help="Collective time, algbw, busbw per size.")
@click.option("--world-size", default=4, show_default=True, type=click.IntRange(1, 64), help="Local workers.")
@click.option("--ops", type=CommaList(click.Choice(_COLLECTIVE_OPS)), default=",".join(_COLLECTIVE_OPS),
              show_default=True,
              help="Comma-separated operations.")
@click.option("--sizes", type=ByteSizes(), default="1K-64M", show_default=True,
              help="Byte sizes: a range (every 4th power of two) like 1K-64M, or a list like 1K,1M.")
@click.option("--compare", default="none", show_default=True, help=_COMPARE_HELP)
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 1000), help=_ROUNDS_HELP)
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Timed calls per op, size and round [default: 200 at small sizes, fewer from 1 MiB, at least 5].")
@click.option("--algorithm", type=click.Choice(["auto", "direct", "ring", "shm"]), default="auto",
              show_default=True, help="Force one collective algorithm.")
@click.option("--json", "json_path", type=OutputFile(), help="Write the rows, every round listed, as JSON here.")
def bench_collectives(world_size, ops, sizes, compare, rounds, iters, algorithm, json_path):
    """nccl-tests style table of collective time, algbw and busbw (results checked)."""
    from ringpipe.tools.bench_collectives import main as run_bench, parse_compare

    try:
        run_bench(world_size, ops, sizes, parse_compare(compare), json_path, algorithm, rounds, iters,
                  echo=click.echo, progress=lambda line: click.echo(line, err=True))
    except _ONE_LINE_ERRORS as exc:
        raise _first_line(exc) from None


@bench.command("p2p", short_help="Point-to-point one-way latency (ping-pong) per size.")
@click.option("--sizes", type=ByteSizes(), default="1K-4M", show_default=True,
              help="Byte sizes: a range (every 4th power of two) like 1K-4M, or a list like 1K,1M.")
@click.option("--pingpongs", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Timed round trips per size and round (fewer above 64 KiB, at least 10).")
@click.option("--compare", default="none", show_default=True, help=_COMPARE_HELP)
@click.option("--rounds", default=5, show_default=True, type=click.IntRange(1, 1000), help=_ROUNDS_HELP)
@click.option("--json", "json_path", type=OutputFile(), help="Write the rows, every round listed, as JSON here.")
def bench_p2p(sizes, pingpongs, compare, rounds, json_path):
    """One-way latency between two ranks on this host: half the median round trip of the ping-pongs."""
    from ringpipe.tools.bench_collectives import parse_compare
    from ringpipe.tools.bench_p2p import main as run_bench

    try:
        run_bench(sizes, pingpongs, parse_compare(compare), rounds, json_path, echo=click.echo,
                  progress=lambda line: click.echo(line, err=True))
    except _ONE_LINE_ERRORS as exc:
        raise _first_line(exc) from None


@bench.command("data-parallel", short_help="Weak scaling and overlap of data parallelism.")
@click.option("--dp", "dp_max", default=2, show_default=True, type=click.IntRange(2, 64),
              help="Largest dp size; timed against dp=1 with the same per-rank batch.")
@_shape_options(n_layer=4, n_head=4, n_embd=128, block_size=64)
@click.option("--batch-per-rank", default=12, show_default=True, type=click.IntRange(min=1),
              help="Sequences per dp rank and step.")
@click.option("--microbatches", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--bucket-mb", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True,
              help="Gradient bucket size cap in MiB, as train's --bucket-mb (fractions allowed, e.g. 0.25).")
@click.option("--bucket-kb", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated: the bucket cap in KiB; use --bucket-mb.")
@click.option("--zero", type=click.Choice(["0", "1"]), default="0", show_default=True, help="1: ZeRO-1.")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Timed steps per round (after 3 warmup).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Alternating rounds; each dp size keeps its best.")
@click.option("--no-independent", is_flag=True, help="Skip the row of --dp unconnected dp=1 runs at once.")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
@click.pass_context
def bench_data_parallel(ctx, dp_max, n_layer, n_head, n_embd, block_size, batch_per_rank, microbatches, bucket_mb,
                        bucket_kb, zero, steps, rounds, no_independent, json_path):
    """Weak scaling of data parallelism (dp=1 vs --dp, one BLAS thread per worker), how much of the
    gradient all-reduce overlapped backward, and --dp unconnected dp=1 runs as the machine's limit."""
    from ringpipe.tools.bench_data_parallel import format_table, run

    bucket_bytes = int(bucket_mb * (1 << 20))
    if bucket_kb is not None:  # the flag's old name and unit, still accepted
        if ctx.get_parameter_source("bucket_mb") == click.core.ParameterSource.COMMANDLINE:
            raise bad_flag("--bucket-kb", "give the bucket size once, as --bucket-mb (--bucket-kb is its "
                                          "deprecated KiB form)")
        click.echo(f"--bucket-kb is deprecated; use --bucket-mb {bucket_kb / 1024:g}", err=True)
        bucket_bytes = bucket_kb << 10
    _run_and_report(lambda: run(dp_sizes=(1, dp_max), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                block_size=block_size, batch_per_rank=batch_per_rank,
                                microbatches=microbatches, steps=steps, rounds=rounds,
                                bucket_bytes=bucket_bytes, zero=int(zero),
                                independent=not no_independent),
                    format_table, json_path)


@bench.command("pipeline", short_help="Pipeline bubble per schedule, measured vs theory.")
@click.option("--schedules", type=CommaList(click.Choice(_SCHEDULES)), default="1f1b,zb-h1,gpipe,interleaved",
              show_default=True, help="Comma-separated pipeline schedules.")
@click.option("--microbatches", type=CommaList(click.IntRange(min=1)), default="4,8", show_default=True,
              help="Comma-separated micro-batch counts m.")
@click.option("--pp", default=2, show_default=True, type=click.IntRange(2, 64),
              help="Pipeline stages = workers (keep it ≤ the number of cores).")
@click.option("--virtual-stages", default=2, show_default=True, type=click.IntRange(1, 16),
              help="Chunks per rank for 'interleaved' (the other schedules use 1).")
@_shape_options(n_layer=4, n_head=8, n_embd=256, block_size=128)
@click.option("--microbatch-size", default=4, show_default=True, type=click.IntRange(min=1),
              help="Sequences per micro-batch.")
@click.option("--split", type=CommaList(click.IntRange(min=1)), default=None,
              help="Explicit layers per stage, e.g. 3,1 (needs Layout support).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untraced steps first.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1),
              help="Traced steps (the median is reported).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 100),
              help="Each setup once per round, taking turns; the best round is reported.")
@click.option("--json", "json_path", type=OutputFile(), help="Write one object per (schedule, m).")
@click.option("-v", "--verbose", is_flag=True, help="Also print each row's per-rank times and simulations.")
def bench_pipeline(schedules, microbatches, pp, virtual_stages, n_layer, n_head, n_embd, block_size,
                   microbatch_size, split, warmup, steps, rounds, json_path, verbose):
    """Measured pipeline bubble per schedule and micro-batch count, from the runtime's trace spans, next
    to the theoretical bubble (one BLAS thread per worker). Blocked-on-peer time counts as bubble."""
    from ringpipe.tools.bench_pipeline import format_table, run

    _run_and_report(lambda: run(schedules=schedules, microbatches=microbatches,
                                pp=pp, virtual_stages=virtual_stages, n_layer=n_layer, n_head=n_head,
                                n_embd=n_embd, block_size=block_size, microbatch_size=microbatch_size,
                                warmup=warmup, steps=steps,
                                split=split,
                                echo=lambda line: click.echo(line, err=True), rounds=rounds),
                    lambda rows: format_table(rows, verbose), json_path)


@bench.command("quality", short_help="Val loss of the recipe: ringpipe vs transformers.")
@click.option("--data", default=None, help="Text FILE, DIR or GLOB (default: Python stdlib source).")
@click.option("--seeds", type=CommaList(SEED), default="0", show_default=True,
              help="Comma-separated seeds; one run each.")
@click.option("--samplers", type=CommaList(click.Choice(_SAMPLERS)), default="epoch", show_default=True,
              help="Comma-separated train samplers to run (epoch, random).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Default: the recipe's 2000.")
@click.option("--eval-iters", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="ringpipe: batch shards on threads; PyTorch: torch.set_num_threads.")
@click.option("--no-compare", is_flag=True, help="Skip the PyTorch/transformers runs.")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_quality(data, seeds, samplers, steps, eval_iters, threads, no_compare, json_path):
    """Val loss after a full run of the training recipe, ringpipe vs GPT2LMHeadModel on the same batches."""
    from ringpipe.tools.bench_quality import format_table, run

    _run_and_report(lambda: run(data=data, seeds=seeds, samplers=samplers, steps=steps,
                                eval_iters=eval_iters, threads=threads, compare=not no_compare),
                    format_table, json_path)


@bench.command("int8", short_help="int8 weights vs float32: bytes, perplexity, speed.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--outlier-threshold", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Also score per-channel int8 with LLM.int8() outlier rows (e.g. 6) kept in float.")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, help="Score at most this many val windows.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_int8(run_dir, outlier_threshold, max_windows, new_tokens, rounds, json_path):
    """A trained run's float32 model against int8 per output channel and per tensor, on every window of
    its val split: weight bytes, perplexity change, greedy generation tokens/s."""
    from ringpipe.tools.bench_int8 import format_table, run

    _run_and_report(lambda: run(run_dir, outlier_threshold, max_windows, new_tokens=new_tokens, rounds=rounds,
                                echo=lambda line: click.echo(line, err=True)), format_table, json_path)


@bench.command("gpu-step", short_help="GPU train step tokens/s and MFU vs PyTorch.")
@click.option("--device", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="cpu: a smoke test of the same code (use a tiny shape).")
@click.option("--dtypes", type=CommaList(click.Choice(DTYPES)), default="float32,fp16-mixed", show_default=True,
              help="Comma-separated.")
@_shape_options(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, batch_size=8)
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1),
              help="Timed steps (median), after --warmup.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--tf32", is_flag=True, help="TF32 matmuls for float32 (needs CUPY_TF32=1 in the environment).")
@click.option("--peak-tflops", type=FiniteFloat(min=0, min_open=True), default=None,
              help="The dtype's dense peak, for an unlisted GPU.")
@click.option("--no-compare", is_flag=True, help="Skip PyTorch eager.")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_gpu_step(device, dtypes, n_layer, n_head, n_embd, block_size, vocab_size, batch_size, steps, warmup,
                   tf32, peak_tflops, no_compare, json_path):
    """Training-step tokens/s and MFU of a GPT-2 124M-shaped model vs GPT2LMHeadModel in PyTorch eager."""
    from ringpipe.tools.bench_gpu_step import format_table, run

    _run_and_report(lambda: run(tuple(dtypes), device, steps, warmup, tf32, not no_compare, peak_tflops,
                                n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                vocab_size=vocab_size, batch_size=batch_size),
                    format_table, json_path)


@bench.command("trace-tools", short_help="Time trace summary/view/export on a run.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Runs of each tool.")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_trace_tools(run_dir, repeats, json_path):
    """Wall and CPU time of `ringpipe trace summary|view|export RUN_DIR` (fresh processes) and of the
    report `train --trace` prints after "saved model", on a copy of the run's traces."""
    from ringpipe.tools.bench_trace_tools import format_table, run

    def run_or_fail():
        try:
            return run(run_dir, repeats)
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from None

    _run_and_report(run_or_fail, format_table, json_path)


@bench.command("multihost", short_help="all_reduce busbw and dp overlap across shaped namespace hosts.")
@click.option("--hosts", default="2,3", show_default=True, help="Host counts (one rank per host).")
@click.option("--rates", default="1gbit,200mbit", show_default=True, help="tc tbf link rates (both directions).")
@click.option("--size-mb", type=click.IntRange(min=1), default=64, show_default=True, help="all_reduce size, MiB.")
@click.option("--iterations", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Interleaved; medians.")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="dp steps per round.")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_multihost(hosts, rates, size_mb, iterations, rounds, steps, json_path):
    """Across network-namespace hosts (needs root) with links shaped by tc tbf: all_reduce bus
    bandwidth against the link rate, and how much of the dp step's all-reduce backward hid."""
    from ringpipe.tools.bench_multihost import RATES_BITS, format_table, run
    from ringpipe.tools.namespace_hosts import NamespaceError

    counts = [int(part) for part in hosts.split(",") if part.strip().isdigit()]
    chosen = [part.strip() for part in rates.split(",") if part.strip()]
    if not counts or min(counts) < 2:
        raise bad_flag("--hosts", f"{hosts!r} is not a comma list of host counts of 2 or more")
    if not chosen or set(chosen) - set(RATES_BITS):
        raise bad_flag("--rates", f"{rates!r}: choose from {', '.join(RATES_BITS)}")

    def measure():
        try:
            return run(host_counts=counts, rates=chosen, size=size_mb << 20, iterations=iterations, rounds=rounds,
                       steps=steps)
        except NamespaceError as exc:
            raise ValueError(f"cannot make namespace hosts here: {exc}") from None

    _run_and_report(measure, format_table, json_path)


@bench.command("memory", short_help="Train a model too big for one worker, under cgroup limits.")
@click.option("--n-layer", default=24, show_default=True, type=click.IntRange(min=1))
@click.option("--n-embd", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option("--n-head", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--vocab-size", default=50257, show_default=True, type=click.IntRange(2, 65535))
@click.option("--block-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1), help="Global, in sequences.")
@click.option("--microbatches", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--dp", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--tp", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--pp", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--zero", type=click.IntRange(0, 1), default=0, show_default=True, help="1: ZeRO-1 (needs --dp 2+).")
@click.option("--worker-memory", type=FiniteFloat(min=0, min_open=True), default=3.0, show_default=True,
              help="GiB each worker's memory cgroup allows; must be below what one process needs.")
@click.option("--out", type=OutputDirectory(), default=None,
              help="Run directory for the token file (default: a temporary one, removed after).")
@click.option("--json", "json_path", type=OutputFile(), help="Write results here.")
def bench_memory(n_layer, n_embd, n_head, vocab_size, block_size, batch_size, microbatches, steps, dp, tp, pp, zero,
                 worker_memory, out, json_path):
    """Train a few steps of a model whose float32 weights, gradients and AdamW moments do not fit the memory
    one worker is given (a cgroup per worker), and report per rank and for the driver the peak RSS and
    the bytes of weights / gradients / optimizer state / activations held."""
    import shutil
    import tempfile

    from ringpipe.cluster.distributed_train import DistributedRun
    from ringpipe.runtime.memory_cgroup import unavailable
    from ringpipe.tools.bench_memory import format_table, run

    reason = unavailable()
    if reason:
        raise click.ClickException(reason)
    directory = out or tempfile.mkdtemp(prefix="ringpipe-bench-memory-")
    try:
        result = _run_and_report(lambda: run(DistributedRun, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                                             vocab_size=vocab_size, block_size=block_size, batch_size=batch_size,
                                             microbatches=microbatches, steps=steps, dp=dp, tp=tp, pp=pp, zero=zero,
                                             worker_limit_bytes=int(worker_memory * (1 << 30)), out=directory,
                                             say=lambda line: click.echo(line, err=True)),
                                 format_table, json_path)
        missed = [name.replace("_", " ") for name, met in result["targets"].items() if not met]
        if missed:
            raise click.ClickException(f"bench memory: {len(missed)} target(s) MISSED: {'; '.join(missed)}")
    finally:
        if out is None:
            shutil.rmtree(directory, ignore_errors=True)


@bench.command("generate", short_help="Generation tokens/s and time to first token per layout.")
@click.option("--layouts", default=",".join(("1", "tp2", "pp2", "dp2", "tp4", "pp4", "tp2xpp2")), show_default=True,
              help="Comma-separated layouts: 1, or dpN/tpN/ppN joined by x.")
@_shape_options(n_layer=8, n_head=8, n_embd=256, block_size=128, vocab_size=8192)
@click.option("--prompts", default=8, show_default=True, type=click.IntRange(1))
@click.option("--prompt-length", default=32, show_default=True, type=click.IntRange(1))
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 100),
              help="Each layout once per round, taking turns; the median round is reported.")
@click.option("--threads-per-worker", default=1, show_default=True, type=click.IntRange(1, 256),
              help="BLAS threads of each worker.")
@click.option("--json", "json_path", type=OutputFile(), help="Write one object per layout.")
def bench_generate(layouts, n_layer, n_head, n_embd, block_size, vocab_size, prompts, prompt_length, new_tokens,
                   rounds, threads_per_worker, json_path):
    """Tokens/s and time to first token of `ringpipe generate` split over workers, on a model that fits one
    process, against one worker: what splitting costs."""
    from ringpipe.tools.bench_generate import format_table, run

    if prompt_length + new_tokens > block_size:
        raise bad_flag("--new-tokens", f"prompt {prompt_length} + {new_tokens} new tokens exceed --block-size "
                                       f"{block_size}")
    _run_and_report(lambda: run([name.strip() for name in layouts.split(",") if name.strip()], n_layer=n_layer,
                                n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                                prompts=prompts, prompt_length=prompt_length, new_tokens=new_tokens, rounds=rounds,
                                threads_per_worker=threads_per_worker, echo=lambda line: click.echo(line, err=True)),
                    format_table, json_path)

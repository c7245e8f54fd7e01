"""The GPU path: the same model code on CuPy arrays gives what NumPy gives, alone and across workers.

Skipped without CuPy and a CUDA device (CI has neither); `tools/gpu_check.sh` runs these on a machine
that has both. float64 throughout, so CPU and GPU agree to rounding.
"""
import dataclasses

import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.parallel.tensor_parallel import assemble_full_params
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

cupy = pytest.importorskip("cupy")
try:
    HAVE_GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # no driver, no device
    HAVE_GPU = False
pytestmark = pytest.mark.skipif(not HAVE_GPU, reason="no CUDA device")

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, dtype="float64")
TOLERANCE = dict(rtol=1e-9, atol=1e-12)


def test_loss_and_every_gradient_on_the_gpu_equal_the_cpu():
    idx = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, CONFIG.block_size))
    cpu = GPT(CONFIG, seed=0)
    gpu = GPT(dataclasses.replace(CONFIG, device="gpu"), seed=0)
    loss_cpu, grads_cpu = cpu.loss_and_grads(idx, idx)
    loss_gpu, grads_gpu = gpu.loss_and_grads(cupy.asarray(idx), cupy.asarray(idx))
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-12)
    assert sorted(grads_gpu) == sorted(grads_cpu)
    for name, g in grads_cpu.items():
        assert isinstance(grads_gpu[name], cupy.ndarray), name
        np.testing.assert_allclose(cupy.asnumpy(grads_gpu[name]), g, **TOLERANCE, err_msg=name)


def test_generation_on_the_gpu_gives_the_cpu_tokens():
    prompt = np.array([[1, 2, 3]])
    cpu = GPT(CONFIG, seed=0).generate(prompt, 5, temperature=1.0, top_k=4, seed=7)
    gpu = GPT(dataclasses.replace(CONFIG, device="gpu"), seed=0).generate(cupy.asarray(prompt), 5,
                                                                          temperature=1.0, top_k=4, seed=7)
    np.testing.assert_array_equal(cupy.asnumpy(gpu), np.asarray(cpu))


def _train_config(tmp_path, device) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return TrainConfig(data=str(corpus), n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=8,
                       microbatches=2, steps=3, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1,
                       dtype="float64", grad_clip=0.5, device=device)


def _single_process(tmp_path, device):
    trainer = Trainer.create(_train_config(tmp_path / device, device), str(tmp_path / device / "run"))
    losses = [trainer.train_step(step)["loss"] for step in range(3)]
    return trainer, losses, trainer.params_on_host()


def test_three_training_steps_on_the_gpu_equal_the_cpu(tmp_path):
    _, losses_cpu, params_cpu = _single_process(tmp_path, "cpu")
    _, losses_gpu, params_gpu = _single_process(tmp_path, "gpu")
    np.testing.assert_allclose(losses_gpu, losses_cpu, rtol=1e-10)
    for name, value in params_cpu.items():
        np.testing.assert_allclose(params_gpu[name], value, **TOLERANCE, err_msg=name)


@pytest.mark.parametrize("dp,tp,pp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_parallel_layouts_on_the_gpu_equal_single_process_cpu(local_cluster, tmp_path, dp, tp, pp):
    """Workers share the one GPU: arrays stay on it and travel through host memory between workers."""
    reference, _, expected = _single_process(tmp_path, "cpu")
    config = _train_config(tmp_path / "cpu", "gpu")
    layout = Layout(dp=dp, tp=tp, pp=pp, schedule="1f1b")
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(
        ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
        str(tmp_path / "cpu" / "run" / "tokens.bin"), reference.tokenizer.vocab_size)
    for step in range(3):
        trainers.train_step(step).result()
    tables = trainers.shard_table().result()
    got = assemble_full_params(trainers.local_params().result(), tables)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)


# ---- mixed precision on the GPU: the CPU test's tolerance ------------------------------------------------
def test_fp16_mixed_loss_curve_on_the_gpu_equals_float32_within_2e_2_at_each_of_50_steps(tmp_path):
    from tests.test_mixed_precision import STEPS, small_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    full = Trainer.create(small_config(str(corpus), dtype="float32", device="gpu"), str(tmp_path / "float32"))
    mixed = Trainer.create(small_config(str(corpus), device="gpu"), str(tmp_path / "mixed"))
    assert isinstance(mixed.gpt.params["wte.weight"], cupy.ndarray)
    assert mixed.gpt.params["wte.weight"].dtype == np.float16
    for step in range(STEPS):
        expected, got = full.train_step(step), mixed.train_step(step)
        assert not got["skipped"], step
        assert abs(got["loss"] - expected["loss"]) <= 2e-2, (step, got["loss"], expected["loss"])


# ---- NCCL -------------------------------------------------------------------------------------------------
def _every_collective(comm) -> dict:
    """Each collective once on CuPy arrays (the same calls for the NCCL and the runtime's communicator);
    _check_nccl_results knows the answers."""
    n, r = comm.size, comm.rank
    x = cupy.arange(6, dtype=cupy.float32) + r
    out = {"sum": comm.all_reduce(x.copy()), "avg": comm.all_reduce(x.copy(), op="avg"),
           "max": comm.all_reduce(x.copy(), op="max", async_op=True).wait(),
           "half": comm.all_reduce(cupy.ones(5, cupy.float16)),
           "reduce_scatter": comm.reduce_scatter(cupy.arange(4 * n, dtype=cupy.float64).reshape(2 * n, 2)),
           "all_gather": comm.all_gather(cupy.full((1, 3), r, cupy.int64)),
           "broadcast": comm.broadcast(cupy.full(4, r, cupy.float32), src=n - 1)}
    comm.barrier()
    return out


def nccl_collectives(control):
    """Every collective of the NCCL communicator on this rank's GPU (device = rank)."""
    from ringpipe.runtime.nccl_communicator import NcclCommunicator

    cupy.cuda.Device(control.rank).use()
    comm = NcclCommunicator(control)
    n, r = comm.size, comm.rank
    out = _every_collective(comm)
    if n > 1:
        if r == 0:
            comm.send(cupy.arange(6, dtype=cupy.float16).reshape(2, 3), 1, tag=3)
        elif r == 1:
            out["recv"] = comm.recv(0, tag=3)
    assert all(isinstance(v, cupy.ndarray) for v in out.values())
    comm.destroy()
    return {k: cupy.asnumpy(v) for k, v in out.items()}


def _check_nccl_results(results):
    n = len(results)
    base = np.arange(6, dtype=np.float32)
    total = sum(base + r for r in range(n))
    full = np.arange(4 * n, dtype=np.float64).reshape(2 * n, 2) * n
    for r, out in enumerate(results):
        np.testing.assert_array_equal(out["sum"], total)
        np.testing.assert_allclose(out["avg"], total / n, rtol=1e-6)
        np.testing.assert_array_equal(out["max"], base + n - 1)
        np.testing.assert_array_equal(out["half"], np.full(5, n, np.float16))
        np.testing.assert_array_equal(out["reduce_scatter"], full[2 * r:2 * r + 2])
        np.testing.assert_array_equal(out["all_gather"], np.repeat(np.arange(n), 3).reshape(n, 3))
        np.testing.assert_array_equal(out["broadcast"], np.full(4, n - 1, np.float32))
    if n > 1:
        np.testing.assert_array_equal(results[1]["recv"], np.arange(6).reshape(2, 3))


def _nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", False))


needs_nccl = pytest.mark.skipif(HAVE_GPU and not _nccl_available(),
                                reason="CuPy has no NCCL here (cupy.cuda.nccl.available is False)")


@needs_nccl
@pytest.mark.timeout(120)
def test_nccl_communicator_with_one_rank_runs_every_collective_on_the_device(local_cluster):
    _check_nccl_results(local_cluster(1).run(nccl_collectives))


@needs_nccl
@pytest.mark.timeout(120)
@pytest.mark.skipif(HAVE_GPU and cupy.cuda.runtime.getDeviceCount() < 2,
                    reason="multi-rank NCCL needs a GPU per rank: NCCL refuses two ranks of one communicator on "
                           "one device, so with one GPU it stays untested")
def test_nccl_communicator_with_two_ranks_on_two_gpus(local_cluster):
    _check_nccl_results(local_cluster(2).run(nccl_collectives))


# ---- the step benchmark, on the GPU with a small shape (the 124M run is tools/gpu_check.sh's) -----------
def test_bench_gpu_step_runs_on_the_gpu_with_a_small_shape():
    from ringpipe.tools.bench_gpu_step import run

    result = run(device="gpu", steps=2, warmup=1, compare=False, n_layer=2, n_head=2, n_embd=64, block_size=64,
                 vocab_size=100, batch_size=2)
    assert [row["dtype"] for row in result["rows"] if row["implementation"] == "ringpipe"] == ["float32",
                                                                                              "fp16-mixed"]
    assert all(row["tokens_per_s"] > 0 for row in result["rows"] if "skipped" not in row)


# ---- the runtime's own collectives on CuPy arrays (staged through host memory), 2-4 ranks on one GPU --------
def runtime_ops_on_cupy(comm):
    r = comm.rank
    out = _every_collective(comm)
    if r == 0:
        comm.send(cupy.arange(6, dtype=cupy.float16).reshape(2, 3), 1, tag=3)
    elif r == 1:
        into = cupy.zeros((2, 3), cupy.float16)
        comm.recv(0, tag=3, out=into)
        out["recv"] = into
    kinds = {k: type(v).__module__.split(".")[0] for k, v in out.items()}
    return kinds, {k: cupy.asnumpy(v) for k, v in out.items()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_runtime_collectives_on_cupy_arrays_give_every_op_its_result_and_stay_on_the_device(local_cluster,
                                                                                            world_size):
    results = local_cluster(world_size).run(runtime_ops_on_cupy)
    assert all(set(kinds.values()) == {"cupy"} for kinds, _ in results)
    _check_nccl_results([out for _, out in results])

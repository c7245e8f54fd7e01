"""The GPU path: the same model code on CuPy arrays gives what NumPy gives, alone and across workers.

Skipped without CuPy and a CUDA device (CI has neither); `tools/gpu_check.sh` runs these on a machine
that has both. float64 throughout, so CPU and GPU agree to rounding.
"""
import dataclasses

import numpy as np
import pytest

from model.gpt import GPT, GPTConfig
from model.parallel.tensor_parallel import assemble_full_params
from model.parallel.trainer import Layout, ParallelTrainer
from model.train import Trainer, TrainConfig
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
    layouts = trainers.param_layout().result()
    got = assemble_full_params(trainers.local_params().result(), layouts)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-7, atol=1e-9, err_msg=name)

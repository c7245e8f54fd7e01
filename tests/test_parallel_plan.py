"""A second model family trains through model/parallel unchanged: model/parallel names no weight.

The family here is a toy "residual MLP language model", unlike GPT-2 in its names and its blocks:
a tied token embedding `embed.tokens.weight` (vocab-parallel), blocks `mix.{i}` of
scale → column-parallel `up` → ReLU → row-parallel `down` → residual, and a scaled LM head on the
tied embedding. Its plan is all model/parallel learns about it; dp, tp, pp and their combination
must train it exactly as one process does (float64).
"""
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest

from ringpipe.model.nn import ops
from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.nn.optim import AdamW, clip_scale, lr_at
from ringpipe.model.parallel.plan import REPLICATED, Sharding, column_parallel, row_parallel, vocab_parallel
from ringpipe.model.parallel.stage import Stage
from ringpipe.model.parallel.tensor_parallel.layers import (vocab_parallel_cross_entropy_backward,
                                                   vocab_parallel_cross_entropy_forward,
                                                   vocab_parallel_embedding_backward, vocab_parallel_embedding_forward)
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT

STEPS = 3
TOLERANCE = dict(rtol=1e-7, atol=1e-9)  # as tests/test_parallel_equivalence.py
TIED = "embed.tokens.weight"


class ResidualMLPPlan:
    """The toy family's parallel plan, from the GPTConfig a TrainConfig describes (n_embd, n_layer,
    vocab_size; hidden width 2 × n_embd)."""

    tied_params = (TIED,)

    def __init__(self, config):
        self.config, self.dtype, self.device, self.num_layers = config, config.dtype, config.device, config.n_layer
        self.width = 2 * config.n_embd

    def init_params(self, seed):
        rng, C, F = np.random.default_rng(seed), self.config.n_embd, self.width
        params = {TIED: rng.normal(0, 0.1, (self.config.vocab_size, C))}
        for i in range(self.num_layers):
            params.update({f"mix.{i}.scale": 1 + rng.normal(0, 0.1, C), f"mix.{i}.up.weight": rng.normal(0, 0.2, (C, F)),
                           f"mix.{i}.up.bias": rng.normal(0, 0.1, F), f"mix.{i}.down.weight": rng.normal(0, 0.2, (F, C)),
                           f"mix.{i}.down.bias": rng.normal(0, 0.1, C)})
        params["head.scale"] = 1 + rng.normal(0, 0.1, C)
        return params

    def embedding_params(self):
        return [TIED]

    def block_params(self, i):
        return [f"mix.{i}.{name}" for name in ("scale", "up.weight", "up.bias", "down.weight", "down.bias")]

    def head_params(self):
        return [TIED, "head.scale"]

    def sharding(self, name):
        part = name.split(".", 2)[-1]
        return {TIED: vocab_parallel(0), "up.weight": column_parallel(1), "up.bias": column_parallel(0),
                "down.weight": row_parallel(0)}.get(name if name == TIED else part,
                                                    Sharding(sequence_partial=True) if "scale" in name else REPLICATED)

    def check_tensor_parallel(self, size, rank, sequence_parallel):
        if self.width % size:
            raise ValueError(f"toy: width {self.width} is not divisible by tp {size} (rank {rank})")

    def stage_pieces(self, stage):
        return ResidualMLPPieces(self.config, stage)


class ResidualMLPPieces:
    def __init__(self, config, stage):
        self.config, self.stage, self.p = config, stage, stage.params
        self.rows = -(-config.vocab_size // stage.tp_size)
        self.start = stage.tp_rank * self.rows

    def _in(self, x):
        return self.stage.input_region.forward(x, self.stage.tp)

    def _in_back(self, dx):
        return self.stage.input_region.backward(dx, self.stage.tp)

    def embedding_forward(self, idx, dropout_seed):
        if not self.stage.tensor_parallel:
            return ops.embedding_forward(self.p[TIED], idx)
        tok, lookup = vocab_parallel_embedding_forward(self.p[TIED], idx, self.start)
        return self.stage.output_region.forward(tok, self.stage.tp), lookup

    def embedding_backward(self, cache, dx):
        if not self.stage.tensor_parallel:
            return {TIED: ops.embedding_backward(dx, cache, self.config.vocab_size)}
        dtok = self.stage.output_region.backward(dx, self.stage.tp)
        return {TIED: vocab_parallel_embedding_backward(dtok, cache, self.rows)}

    def block_forward(self, i, x, dropout_seed):
        p, h = self.p, f"mix.{i}."
        a = self._in(x * p[h + "scale"])
        u = a @ p[h + "up.weight"] + p[h + "up.bias"]
        g = np.maximum(u, 0)
        y = self.stage.output_region.forward(g @ p[h + "down.weight"], self.stage.tp) + p[h + "down.bias"]
        return x + y, (x, a, u, g)

    def block_backward_input(self, i, cache, dout):
        p, h, (x, a, u, g) = self.p, f"mix.{i}.", cache
        dy = self.stage.output_region.backward(dout, self.stage.tp)
        du = (dy @ p[h + "down.weight"].T) * (u > 0)
        da = self._in_back(du @ p[h + "up.weight"].T)
        grads = {h + "down.bias": dy.sum((0, 1)), h + "up.bias": du.sum((0, 1)), h + "scale": (da * x).sum((0, 1))}
        return da * p[h + "scale"] + dout, SimpleNamespace(layer=i, grads=grads, pending=[(h + "up.weight", a, du),
                                                                                        (h + "down.weight", g, dy)])

    def block_backward_weight(self, deferred):
        for name, x, dout in deferred.pending:
            deferred.grads[name] = x.reshape(-1, x.shape[-1]).T @ dout.reshape(-1, dout.shape[-1])
        return deferred.grads

    def head_forward(self, x, targets):
        a = self._in(x * self.p["head.scale"])
        logits = a @ self.p[TIED].T
        if self.stage.tensor_parallel:
            loss, ce = vocab_parallel_cross_entropy_forward(logits, targets, self.start, self.config.vocab_size,
                                                            self.stage.tp)
        else:
            loss, ce = ops.cross_entropy_forward(logits, targets)
        return loss, (x, a, ce)

    def head_backward(self, cache, dloss):
        x, a, ce = cache
        backward = vocab_parallel_cross_entropy_backward if self.stage.tensor_parallel else ops.cross_entropy_backward
        dlogits = backward(ce, dloss)
        da = self._in_back(dlogits @ self.p[TIED])
        grads = {TIED: dlogits.reshape(-1, dlogits.shape[-1]).T @ a.reshape(-1, a.shape[-1]),
                 "head.scale": (da * x).sum((0, 1))}
        return da * self.p["head.scale"], grads

    def head_logits(self, x):
        raise NotImplementedError("the toy family is trained, not sampled")


PLAN = f"{__name__}:ResidualMLPPlan"


def config_for(tmp_path) -> TrainConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return TrainConfig(data=str(corpus), n_layer=4, n_head=2, n_embd=8, block_size=8, batch_size=16, microbatches=4,
                       steps=STEPS, warmup=1, lr=1e-2, min_lr=1e-3, eval_iters=1, dtype="float64", grad_clip=0.5)


def single_process_training(config: TrainConfig, token_file: str, vocab_size: int) -> dict:
    """The toy model trained in this process: the whole model on one stage without tensor parallelism,
    each step's global batch at once, the global gradient norm clipped, AdamW."""
    plan = ResidualMLPPlan(config.gpt_config(vocab_size))
    model = Stage(plan, plan.init_params(config.seed), range(config.model.n_layer), True, True)
    optimizer = AdamW(model.params, (config.beta1, config.beta2), config.eps, config.weight_decay)
    dataset = TokenDataset.from_file(token_file, config.val_fraction)
    for step in range(STEPS):
        x, y = dataset.get_batch("train", step, config.batch_size, config.model.block_size, config.seed, config.sampler)
        model.zero_grads()
        _, caches = model.forward(x, y)
        model.backward_weight(model.backward_input(caches, 1.0)[1])
        norm = math.sqrt(sum(float(np.vdot(g, g)) for g in model.grads.values()))
        for g in model.grads.values():
            g *= clip_scale(norm, config.grad_clip)
        optimizer.update(model.params, model.grads, lr_at(step, config.lr, config.min_lr, config.warmup, STEPS))
    return {name: np.array(p) for name, p in model.params.items()}


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("toy")
    config = config_for(tmp_path)
    data = Trainer.create(config, str(tmp_path / "run"))  # writes the token file, as a parallel run's driver does
    token_file, vocab = str(tmp_path / "run" / "tokens.bin"), data.tokenizer.vocab_size
    return config, token_file, vocab, single_process_training(config, token_file, vocab)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [dict(dp=2), dict(tp=2), dict(pp=2), dict(pp=2, schedule="zb-h1"),
                                    dict(dp=2, tp=2, pp=2), dict(dp=2, tp=2, zero=1, sequence_parallel=True)],
                         ids=lambda layout: "-".join(f"{k}={v}" for k, v in layout.items()))
def test_a_second_model_family_trains_through_model_parallel_as_in_one_process(local_cluster, toy_reference,
                                                                             layout):
    from ringpipe.model.parallel.tensor_parallel import assemble_full_params

    config, token_file, vocab, expected = toy_reference
    layout = Layout(**layout)
    layout.validate(config)
    trainers = local_cluster(layout.world_size).spawn(ParallelTrainer, dataclasses.asdict(config),
                                                      dataclasses.asdict(layout), token_file, vocab, plan=PLAN)
    for step in range(STEPS):
        trainers.train_step(step).result()
    got = assemble_full_params(trainers.local_params().result(), trainers.shard_table().result())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, **TOLERANCE, err_msg=name)
    changed = [name for name, value in expected.items()
               if not np.allclose(value, ResidualMLPPlan(config.gpt_config(vocab)).init_params(config.seed)[name])]
    assert sorted(changed) == sorted(expected)  # every weight, the tied one included, was trained

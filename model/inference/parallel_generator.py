"""The generator: a runtime actor, one per rank, holding this rank's part of a trained model under a
DP × TP × PP layout and generating with the other ranks.

    generators = cluster.spawn(ParallelGenerator, weights_source(directory), {"dp": 1, "tp": 2, "pp": 2})
    per_rank = generators.generate(prompts, max_new_tokens, temperature=0.8, top_k=40, seed=0).result()
    merge_generations(per_rank)       # pipelined_generation.py: {"tokens": {prompt index: ids}, ...}

Each rank builds the mesh, takes the blocks of its pipeline stage (the split that balances parameter
bytes) and reads only its tensor-parallel shards of them (weights.py); no rank holds the whole model.
Data-parallel replicas each generate a contiguous share of the prompts.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.families import family
from ringpipe.model.inference.pipelined_generation import generate_on_mesh
from ringpipe.model.inference.weights import model_config, read_rank_weights
from ringpipe.model.parallel.mesh import Mesh, parallel_axes
from ringpipe.model.parallel.pipeline_parallel.schedules import split_layers
from ringpipe.model.parallel.plan import stage_sizes
from ringpipe.model.parallel.stage import Stage


class ParallelGenerator:
    def __init__(self, comm, source: dict, layout: dict):
        """`source`: model/inference/weights.py's `weights_source`; `layout`: {"dp", "tp", "pp"} (1 if
        left out) whose product is the world size."""
        self.layout = {"dp": 1, "tp": 1, "pp": 1, **layout}
        self.config = model_config(source)
        self.plan = family(source["family"]).parallel_plan(self.config)
        dp, tp, pp = self.layout["dp"], self.layout["tp"], self.layout["pp"]
        self.mesh = Mesh(comm, parallel_axes(dp, tp, pp), ties=False)  # no gradients to sum over a tie
        layers = split_layers(self.plan.num_layers, pp, None, **stage_sizes(self.plan))[self.mesh.pp_rank]
        first, last = self.mesh.pp_rank == 0, self.mesh.pp_rank == pp - 1
        self.stage = Stage(self.plan, self.plan.param_shapes(), layers, first, last, self.mesh.tp)
        self.stage.grads = {}  # inference: no gradients
        for name, weight in read_rank_weights(source, self).items():
            param = self.stage.params[name]
            if isinstance(weight, np.ndarray):
                param[...] = self.stage.xp.asarray(weight.astype(param.dtype, copy=False))
            else:  # a weight in another format the linears take as it is (an int8 weight): the pieces see it
                self.stage.params[name] = weight

    def shard_table(self) -> dict:
        """{name: {"axis", "parts", "tp_rank", "tp_size", "full_shape"}} of this rank's parameters."""
        return self.stage.shard_table()

    def weight_bytes(self) -> int:
        return int(sum(p.nbytes for p in self.stage.params.values()))

    def generate(self, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, microbatches: int | None = None, started: float | None = None):
        """model/inference/pipelined_generation.py's `generate_on_mesh` with this rank's stage."""
        return generate_on_mesh({self.mesh.pp_rank: self.stage}, self.mesh, self.layout["pp"], prompts, max_new_tokens,
                                temperature, top_k, seed, microbatches, started)

"""The driver side of generation across workers (`ringpipe generate --nproc N`, `ringpipe bench generate`):
worker processes, one `ParallelGenerator` actor per rank (parallel_generator.py), each holding its part
of the model; the driver holds none."""
from __future__ import annotations

import time

from ringpipe.model.inference.parallel_generator import ParallelGenerator
from ringpipe.model.inference.pipelined_generation import merge_generations
from ringpipe.model.inference.weights import model_config, weights_source
from ringpipe.model.families import family
from ringpipe.model.parallel.pipeline_parallel.schedules import split_layers
from ringpipe.runtime import Cluster


def check_generation_layout(source: dict, dp: int, tp: int, pp: int) -> None:
    """ValueError before any worker starts, naming the size the model cannot be split by."""
    plan = family(source["family"]).parallel_plan(model_config(source))
    if tp > 1:
        try:
            plan.check_tensor_parallel(tp, 0, False)
        except ValueError as exc:
            raise ValueError(str(exc).replace(" (rank 0)", "")) from None  # no worker has started
    split_layers(plan.num_layers, pp)


class DistributedGenerator:
    """Workers holding a model under dp × tp × pp; `generate` as often as wanted, then `close` (or use as
    a context manager). `source`: a directory, or what model/inference/weights.py's `weights_source`
    made of one."""

    def __init__(self, source: str | dict, dp: int = 1, tp: int = 1, pp: int = 1, device: str = "cpu",
                 timeout: float = 120.0, cluster_options: dict | None = None):
        self.source = weights_source(source, device) if isinstance(source, str) else source
        check_generation_layout(self.source, dp, tp, pp)
        self.layout = {"dp": dp, "tp": tp, "pp": pp}
        self.cluster = Cluster(dp * tp * pp, timeout=timeout, **(cluster_options or {}))
        try:
            self.generators = self.cluster.spawn(ParallelGenerator, self.source, self.layout)
        except BaseException:
            self.cluster.close()
            raise

    def generate(self, prompts: list, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, microbatches: int | None = None) -> dict:
        """{"tokens": {prompt index: generated ids}, "first_token_s": {prompt index: seconds}} for
        `prompts` (lists of token ids)."""
        return merge_generations(self.generators.generate(
            [list(map(int, p)) for p in prompts], max_new_tokens, temperature, top_k, seed, microbatches,
            time.time()).result())

    def weight_bytes(self) -> list:
        """Bytes of weights each rank holds, by rank."""
        return self.generators.weight_bytes().result()

    def close(self) -> None:
        self.cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

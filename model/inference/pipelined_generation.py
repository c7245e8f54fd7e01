"""Generation across the ranks of a layout: pipeline stages pass each new token's activations stage to
stage, several micro-batches of prompts in flight, and the last stage's new tokens go back to the first.

Every rank of a pipeline runs `generate_on_rank` with the stages it holds (`GenerationStage`). The
work is the tasks (step, micro-batch, stage), each rank doing its own in that order:

    stage 0      step 0: the prompt (its last block_size tokens); step s > 0: the token the last stage
                 sampled at step s - 1 (or, once the cache is full, the last block_size tokens again)
    stage k      the activations (B, T, C) of stage k - 1 for the same step and micro-batch
    last stage   the logits of the last position, then the next token, sampled (sampling.py) and
                 sent back to stage 0 for step s + 1

Sends are asynchronous and receives are posted a step ahead, so while stage 1 works on micro-batch 0
stage 0 goes on to micro-batch 1: with at least as many micro-batches as stages no stage is idle by
design. The order is a topological order of the tasks' dependencies, so it cannot deadlock. Tensor-
parallel peers run the same tasks together (their collectives are inside the pieces) and each sends to
its peer of the next stage; they sample alike, as their gathered logits are the same.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from ringpipe.model.inference.kv_cache import forward_cached, new_kv_cache, supports_cached_generation
from ringpipe.model.inference.sampling import StepUniforms, prompt_microbatches, sample
from ringpipe.model.parallel.tensor_parallel.tensor_parallel_communications import input_region, output_region
from ringpipe.runtime.array_module import to_host


@dataclass
class GenerationStage:
    """One stage of the chain a rank holds: its index (0 embeds, num_stages - 1 has the head), its
    pieces (kv_cache.py) and its layers."""
    index: int
    pieces: object
    layers: range
    first: bool
    last: bool


@dataclass
class Request:
    """What to generate: `prompts` {global prompt index: token ids} (this replica's share), of
    `total_prompts` in all; `microbatches` groups of them in flight."""
    prompts: dict
    total_prompts: int
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    microbatches: int = 1


def generate_on_rank(stages: list[GenerationStage], pp_comm, num_stages: int, request: Request,
                     started: float | None = None) -> dict | None:
    """Run this rank's tasks. `pp_comm`: the pipeline communicator (group rank = pipeline rank; stage
    s is on rank s % size), None when this rank holds every stage. On a rank holding the last stage:
    {"tokens": {prompt index: generated ids}, "first_token_s": {prompt index: seconds after `started`
    (a time.time()) until its first token}}; None elsewhere."""
    order = sorted(request.prompts)
    lengths = [len(request.prompts[i]) for i in order]
    groups = [[order[p] for p in group] for group in prompt_microbatches(lengths, request.microbatches)]
    run = _Run(stages, pp_comm, num_stages, request, groups, time.time() if started is None else started)
    by_index = {stage.index: stage for stage in stages}
    for step, mb, index in rank_tasks(sorted(by_index), len(groups), request.max_new_tokens):
        if mb == 0 and index == min(by_index):
            run.post_receives(step)
            run.post_receives(step + 1)  # a step ahead: they arrive while this step's work runs
        run.task(step, mb, by_index[index])
    run.finish_sends()  # (after a failure the runtime's abort drops what is in flight)
    return run.result() if any(stage.last for stage in stages) else None


def rank_tasks(stages: list[int], microbatches: int, steps: int) -> list[tuple]:
    """The (step, micro-batch, stage) tasks of a rank holding `stages`, in the order it does them: step
    by step, micro-batch by micro-batch, its stages in chain order (a topological order of the tasks'
    dependencies on every rank, so the ranks cannot wait on one another in a cycle)."""
    return [(step, mb, stage) for step in range(steps) for mb in range(microbatches) for stage in stages]


class _Run:
    def __init__(self, stages, pp_comm, num_stages, request, groups, started):
        self.stages, self.pp, self.num_stages, self.request, self.groups = stages, pp_comm, num_stages, request, groups
        self.started = started
        self.block_size = stages[0].pieces.config.block_size
        self.xp = stages[0].pieces.xp
        self.my_rank = 0 if pp_comm is None else pp_comm.rank
        self.uniforms = StepUniforms(request.seed, request.total_prompts) if request.temperature else None
        self.tokens = {mb: np.array([request.prompts[i] for i in group], dtype=np.int64)
                       for mb, group in enumerate(groups)}
        self.caches = {}  # (micro-batch, stage) -> KV cache
        self.handed = {}  # (step, micro-batch, stage) -> input from a stage on this rank
        self.posted = {}  # (step, micro-batch, stage) -> posted receive
        self.posted_steps = set()
        self.sends = []
        self.generated = {mb: [] for mb in range(len(groups))}
        self.first_token_s = {}

    def rank_of(self, stage: int) -> int:
        return stage % (1 if self.pp is None else self.pp.size)

    def tag(self, step: int, mb: int, stage: int) -> int:
        """Unique per message of the call: the step, micro-batch and receiving stage."""
        return (step * len(self.groups) + mb) * self.num_stages + stage

    def source(self, step: int, stage: int) -> int | None:
        """The stage whose output is `stage`'s input at `step` (None: the prompt)."""
        if stage > 0:
            return stage - 1
        return None if step == 0 else self.num_stages - 1

    def post_receives(self, step: int):
        """Post this rank's receives of `step` (once), so messages land as they arrive."""
        if step >= self.request.max_new_tokens or step in self.posted_steps:
            return
        self.posted_steps.add(step)
        patience = None if self.pp is None else self.pp.timeout * 10  # may wait through a round of work
        for mb in range(len(self.groups)):
            for stage in self.stages:
                source = self.source(step, stage.index)
                key = (step, mb, stage.index)
                if source is None or self.rank_of(source) == self.my_rank:
                    continue
                self.posted[key] = self.pp.irecv(self.rank_of(source), tag=self.tag(*key), timeout=patience)

    def take(self, step, mb, stage):
        key = (step, mb, stage)
        if key in self.handed:
            return self.handed.pop(key)
        self.post_receives(step)
        return self.posted.pop(key).wait()

    def give(self, step, mb, stage, value):
        """Hand `value` to stage `stage` for (step, mb): locally, or sent to the rank holding it."""
        if self.rank_of(stage) == self.my_rank:
            self.handed[(step, mb, stage)] = value
        else:
            if len(self.sends) > 64:  # let go of the arrays of sends that are done
                self.sends = [handle for handle in self.sends if not handle.is_done()]
            self.sends.append(self.pp.isend(value, self.rank_of(stage), tag=self.tag(step, mb, stage)))

    def task(self, step: int, mb: int, stage: GenerationStage):
        key = (mb, stage.index)
        if key not in self.caches:
            self.caches[key] = new_kv_cache(stage.pieces, len(self.groups[mb]), stage.layers)
        kv = self.caches[key]
        if stage.first:
            if step > 0:
                new = to_host(self.take(step, mb, stage.index)).astype(np.int64)
                self.tokens[mb] = np.concatenate([self.tokens[mb], new[:, None]], axis=1)
            # Decode one token while the cache has room; then, as one process does, the last
            # block_size tokens again into an emptied cache.
            if step > 0 and kv["length"] < self.block_size:
                inputs = self.tokens[mb][:, -1:]
            else:
                inputs = self.tokens[mb][:, -self.block_size:]
            inputs = self.xp.asarray(inputs)
        else:
            inputs = self.take(step, mb, stage.index)
        if kv["length"] + inputs.shape[1] > self.block_size:
            kv["length"] = 0  # the window again, from position 0 (every stage sees the same lengths)
        out = forward_cached(stage.pieces, inputs, kv, stage.layers, stage.first, stage.last)
        if not stage.last:
            self.give(step, mb, stage.index + 1, out)
            return
        request = self.request
        rows = self.groups[mb]
        uniforms = None if self.uniforms is None else self.uniforms.rows(step, rows)
        new = sample(to_host(out).astype(np.float64), request.temperature, request.top_k, uniforms)
        self.generated[mb].append(new)
        if step == 0:
            elapsed = time.time() - self.started
            self.first_token_s.update({i: elapsed for i in rows})
        if step < request.max_new_tokens - 1:
            self.give(step + 1, mb, 0, new)

    def finish_sends(self):
        for handle in self.sends:
            handle.wait()
        self.sends = []

    def result(self) -> dict:
        tokens = {}
        for mb, rows in enumerate(self.groups):
            columns = np.stack(self.generated[mb], axis=1) if self.generated[mb] else np.zeros((len(rows), 0), np.int64)
            tokens.update({i: columns[r].tolist() for r, i in enumerate(rows)})
        return {"tokens": tokens, "first_token_s": self.first_token_s}


def generate_on_mesh(stages: dict, mesh, num_stages: int, prompts: list, max_new_tokens: int,
                     temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                     microbatches: int | None = None, started: float | None = None) -> dict | None:
    """Continue every prompt (token id lists) by max_new_tokens with a rank's `Stage`s {index: stage} of a
    `num_stages` chain (stage s on pipeline rank s % pp) on `mesh` (model/parallel/mesh.py: its pp, dp
    and tp axes). Each data-parallel replica takes a contiguous share of the prompts, `microbatches`
    (default: pp) groups of them in flight. On tp rank 0 of a rank with the last stage:
    `generate_on_rank`'s answer for the replica's prompts (merge them with `merge_generations`); None
    elsewhere."""
    mine = np.array_split(np.arange(len(prompts)), mesh.dp_size)[mesh.dp_rank].tolist()
    request = Request({i: list(prompts[i]) for i in mine}, len(prompts), max_new_tokens, temperature, top_k, seed,
                      microbatches or mesh.pp_size)
    out = generate_on_rank(generation_stages(stages), mesh.pp, num_stages, request, started)
    return out if mesh.tp_rank == 0 else None


def merge_generations(per_rank: list) -> dict:
    """{"tokens": {prompt index: ids}, "first_token_s": {prompt index: seconds}} from every rank's
    `generate_on_mesh` answer."""
    merged = {"tokens": {}, "first_token_s": {}}
    for answer in per_rank:
        if answer is not None:
            for key in merged:
                merged[key].update({int(i): value for i, value in answer[key].items()})
    return merged


def generation_stages(stages: dict) -> list[GenerationStage]:
    """A rank's `Stage`s {index: stage} (model/parallel/stage.py, as a trainer holds them) as
    `GenerationStage`s, in chain order. A sequence-parallel stage's pieces are rebound to the plain
    tensor-parallel regions: one new position cannot be split over the ranks."""
    out = []
    for index in sorted(stages):
        stage = stages[index]
        pieces = stage.pieces
        if stage.sequence_parallel:
            view = copy.copy(stage)
            view.sequence_parallel = False
            view.input_region, view.output_region = input_region(False), output_region(False)
            pieces = stage.plan.stage_pieces(view)
        if not supports_cached_generation(pieces):
            raise ValueError(f"stage {index}: {type(pieces).__name__} cannot generate with a KV cache")
        out.append(GenerationStage(index, pieces, stage.layers, stage.first, stage.last))
    return out


def generate_in_one_process(model, prompts: list, max_new_tokens: int, temperature: float = 1.0,
                            top_k: int | None = None, seed: int | None = None) -> dict:
    """`generate_on_rank` with a dense model (the GPT) as the only stage, for prompts of any lengths:
    {"tokens": {prompt index: generated ids}, "first_token_s": ...}."""
    stage = GenerationStage(0, model, range(model.config.n_layer), True, True)
    request = Request(dict(enumerate(prompts)), len(prompts), max_new_tokens, temperature, top_k, seed)
    return generate_on_rank([stage], None, 1, request)

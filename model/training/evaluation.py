"""Validation loss under a parallel layout, computed by the ranks (the driver holds no weights).

    per_rank = trainers.evaluate().result()          # ParallelTrainer.evaluate -> evaluate_rank(trainer)
    mean_validation_loss(per_rank)                   # {"val_loss"}, as Trainer.evaluate's

The same `eval_iters` val batches as `Trainer.evaluate` (the family's objective, a function of the
index only), each split over dp and into the training micro-batches, pushed forward through the
pipeline by a forward-only schedule (`build_forward_schedule`: no backward, no activations kept).
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.nn.mixed_precision import overflow_expected
from ringpipe.model.parallel.pipeline_parallel.executor import run_pipeline_step
from ringpipe.model.parallel.pipeline_parallel.schedules import build_forward_schedule


def evaluate_rank(trainer) -> dict:
    """{"rank", "dp_rank", "losses"}: the mean loss of each micro-batch on the ranks that hold the last
    stage at tp rank 0 (in (batch, micro-batch) order), None elsewhere."""
    config, layout, mesh = trainer.config, trainer.layout, trainer.mesh
    actions = build_forward_schedule(layout.pp, config.microbatches, layout.virtual_stages)[mesh.pp_rank]
    reports = trainer.num_stages - 1 in trainer.stages and mesh.tp_rank == 0
    losses = []
    with overflow_expected(trainer.gpt_config.dtype):
        for i in range(config.eval_iters):
            inputs, targets = trainer._microbatches("val", i)
            result = run_pipeline_step(actions, trainer.stages, mesh.pp, config.microbatches, trainer.num_stages,
                                       inputs, targets, tracer=trainer.tracer, step=i, forward_only=True)
            losses += [float(result.losses[k]) for k in sorted(result.losses)]
    return {"rank": mesh.rank, "dp_rank": mesh.dp_rank, "losses": losses if reports else None}


def mean_validation_loss(per_rank: list[dict]) -> dict:
    """{"val_loss"} from every rank's `evaluate_rank` answer: the mean over all micro-batches of every
    dp rank (equal-sized, so the mean of the whole batches, as `Trainer.evaluate`'s)."""
    losses = [loss for answer in sorted(per_rank, key=lambda a: a["dp_rank"]) if answer["losses"] is not None
              for loss in answer["losses"]]
    return {"val_loss": float(np.mean(losses))}

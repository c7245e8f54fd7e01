"""Parallel training, for any model family that hands over a parallel plan (plan.py): the mesh with
named axes (mesh.py), one Stage class (stage.py), one folder per parallelism (data_parallel/,
tensor_parallel/, pipeline_parallel/), and the worker-side ParallelTrainer (trainer.py)."""

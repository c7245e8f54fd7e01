"""Training runs: `TrainConfig` (config.py), every file of a run directory (run_dir.py), what a
step means in every loop (step.py) and the single-process loop `Trainer` (trainer.py).
"""

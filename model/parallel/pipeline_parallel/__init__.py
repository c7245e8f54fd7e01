"""Pipeline parallelism: schedules as per-rank action lists (schedules.py), the executor that
interprets them (executor.py), and a simulator that checks and times them without a model."""

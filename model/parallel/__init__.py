"""Parallel training pieces: the DP×TP×PP mesh, pipeline schedules (as data) and their simulator."""

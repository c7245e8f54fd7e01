"""Benchmarks and the trace viewer; called from the CLI, never calling back into it."""

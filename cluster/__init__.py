"""The `ringpipe` command line: training, generation, launching and benchmarks."""

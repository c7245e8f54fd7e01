"""Tensor (and sequence) parallelism: the communication regions (tensor_parallel_communications.py),
vocab-parallel op pairs (layers.py) and how parameters are cut into shards and put back (sharding.py)."""
from ringpipe.model.parallel.tensor_parallel.sharding import assemble_full_optimizer_state, assemble_full_params  # noqa: F401

"""Data parallelism on one host: the gradient buckets' asynchronous averages run on the dp group's
same-host channel (runtime/shm_channel.py), which building the buckets opens."""
import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.parallel.data_parallel import GradientBuckets
from ringpipe.model.parallel.stage import Stage


def average_every_bucket(comm):
    """Build the buckets over a dp group of both ranks, fill the gradients with the rank's number,
    average; (channel open after building, channel publishes while averaging, averaged values)."""
    dp = comm.new_group([0, 1])
    config = GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=16, block_size=8)
    stage = Stage(GPT2ParallelPlan(config), init_params(config), range(2), True, True)
    gradients = GradientBuckets({0: stage}, dp, bucket_bytes=4 << 10)
    channel = comm.engine.channels.get(dp.group.gid)
    published = channel.count if channel is not None else None
    gradients.flat_grads[...] = comm.rank + 1.0
    for b in range(len(gradients.buckets)):
        gradients._launch(b)
    grads = gradients.finish()
    values = sorted({float(v) for g in grads.values() for v in np.unique(g)})
    publishes = channel.count - published if channel is not None else 0
    return channel is not None, publishes, values, len(gradients.buckets)


@pytest.mark.timeout(60)
def test_the_bucket_averages_run_on_the_dp_groups_same_host_channel(local_cluster):
    for opened, publishes, values, buckets in local_cluster(2).run(average_every_bucket):
        assert opened, "building the buckets did not open the dp group's channel"
        assert publishes >= buckets, "the bucket averages did not go through the channel"
        assert values == [1.5]

"""Data parallelism: gradient buckets reduced during backward (data_parallel.py), ZeRO-1, and the
collectives they use (data_parallel_communications.py)."""
from ringpipe.model.parallel.data_parallel.data_parallel import (DEFAULT_BUCKET_BYTES, Bucket, GradientBuckets,  # noqa: F401
                                                        ShardedAdamW, plan_buckets)

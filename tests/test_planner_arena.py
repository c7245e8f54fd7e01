"""The planner's shared-memory term against the arena pages real data-parallel ranks hold: the dp
group channel's two buffers in the rank's own arena, and its peers' buffers it reads, each filled
as far as the largest gradient bucket (model/planning/memory.py's _communication_bytes)."""
import dataclasses
import os

import pytest

from ringpipe.model.planning.gpt2_inventory import GPT2Inventory
from ringpipe.model.planning.memory import Candidate, layout_memory
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.trainer import Trainer
from tests.conftest import TEXT


def arena_pages(comm) -> dict:
    """Resident bytes of this worker's mappings of same-host arenas: {"own", "peers"}."""
    from ringpipe.runtime.shm import SHM_DIR

    held, path = {"own": 0, "peers": 0}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                path = fields[5] if len(fields) >= 6 else ""
            elif fields and fields[0] == "Rss:" and path.startswith(os.path.join(SHM_DIR, "ringpipe-")):
                owner = int(path.rsplit("-", 1)[1])
                held["own" if owner == comm.rank else "peers"] += int(fields[1]) * 1024
    return held


@pytest.mark.timeout(120)
def test_a_data_parallel_rank_holds_its_channel_buffers_and_its_peers_as_the_planner_counts(tmp_path):
    from ringpipe.runtime import Cluster

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    # ~1.6 MB of gradients: a few 1 MiB buckets
    config = TrainConfig(data=str(corpus), n_layer=2, n_head=4, n_embd=128, block_size=16, batch_size=4,
                         steps=3, eval_iters=1, dtype="float32")
    reference = Trainer.create(config, str(tmp_path / "run"))
    layout = Layout(dp=2)
    with Cluster(2, threads_per_worker=1) as cluster:  # fresh arenas: no other test's pages
        trainers = cluster.spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                 str(tmp_path / "run" / "tokens.bin"), reference.tokenizer.vocab_size)
        for step in range(3):
            trainers.train_step(step).result()
        held = cluster.run(arena_pages)
    inventory = GPT2Inventory(config.gpt_config(reference.tokenizer.vocab_size))
    memory = layout_memory(inventory, Candidate(dp=2), config.batch_size)[0]
    page = 4096
    for rank in held:
        # own: the two buffers, each filled by a bucket; peers: the same pages of the peer's arena
        assert 0.9 * memory.shared_memory / 2 <= rank["own"] <= memory.shared_memory / 2 + 16 * page, rank
        assert 0.9 * memory.shared_memory / 2 <= rank["peers"] <= memory.shared_memory / 2 + 16 * page, rank

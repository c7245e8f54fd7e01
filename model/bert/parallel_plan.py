"""BERT's parallel plan (see model/parallel/plan.py): names per pipeline stage, how each is sharded
under tensor parallelism, the tied word embeddings, and a stage's pieces (model/bert/layers.py).

    attention.qkv           column-parallel by heads: n_head/tp heads, their q, k and v columns
    attention.output.dense  row-parallel; bias replicated, added after the reduce
    intermediate.dense      column-parallel;  output.dense row-parallel
    word embeddings         vocab-parallel rows (vocabulary padded to a multiple of tp); the MLM
                            decoder is tied to them, its bias is vocab-parallel too, and the
                            masked-LM cross-entropy runs on the sharded logits
    LayerNorms, position and token-type embeddings, the MLM transform
                            replicated (sequence-partial gradients under sequence parallelism)
    row-parallel biases     replicated; their gradient comes from the gathered dout, so it is whole
    next-sentence head      replicated, computed whole on every rank from the [CLS] row
"""
from __future__ import annotations

from ringpipe.model.bert.config import (EMBEDDING_PARAMS, LAYER_PARAMS, NSP_HEAD_PARAMS, WORD_EMBEDDINGS, BertConfig,
                                        head_params, init_params, layer_prefix)
from ringpipe.model.bert.layers import BertPieces
from ringpipe.model.parallel.plan import REPLICATED, Sharding, column_parallel, row_parallel, vocab_parallel

SEQUENCE_PARTIAL = Sharding(sequence_partial=True)
_SHARDINGS = {"attention.qkv.weight": column_parallel(1, parts=3), "attention.qkv.bias": column_parallel(0, parts=3),
              "attention.output.dense.weight": row_parallel(0), "intermediate.dense.weight": column_parallel(1),
              "intermediate.dense.bias": column_parallel(0), "output.dense.weight": row_parallel(0),
              # Added to sequence shards, but their gradient is taken from the whole gathered dout.
              "attention.output.dense.bias": REPLICATED, "output.dense.bias": REPLICATED,
              WORD_EMBEDDINGS: vocab_parallel(0), "cls.predictions.bias": vocab_parallel(0)}


class BertParallelPlan:
    """The plan of a BERT of `config` (see model/parallel/plan.py for the members)."""

    tied_params = (WORD_EMBEDDINGS,)  # the MLM decoder is the word embedding table

    def __init__(self, config: BertConfig):
        self.config = config
        self.dtype, self.device, self.num_layers = config.dtype, config.device, config.n_layer

    def init_params(self, seed: int) -> dict:
        return init_params(self.config, seed)

    def embedding_params(self) -> list[str]:
        return list(EMBEDDING_PARAMS)

    def block_params(self, i: int) -> list[str]:
        return [layer_prefix(i) + name for name in LAYER_PARAMS]

    def head_params(self) -> list[str]:
        return [WORD_EMBEDDINGS, *head_params(self.config)]

    def sharding(self, name: str) -> Sharding:
        if name in NSP_HEAD_PARAMS:
            return REPLICATED
        part = name.split(".", 3)[3] if name.startswith("encoder.layer.") else name
        return _SHARDINGS.get(part, SEQUENCE_PARTIAL)

    def check_tensor_parallel(self, size: int, rank: int, sequence_parallel: bool) -> None:
        config = self.config
        if config.n_head % size:
            raise ValueError(f"tensor parallel: n_head {config.n_head} is not divisible by tp {size} (rank {rank})")
        if config.mlp_width % size:
            raise ValueError(f"tensor parallel: the MLP width {config.mlp_width} (intermediate_size) is not "
                             f"divisible by tp {size} (rank {rank})")
        if sequence_parallel and config.block_size % size:
            raise ValueError(f"sequence parallel: block_size {config.block_size} is not divisible by tp {size}")

    def stage_pieces(self, stage) -> BertPieces:
        return BertPieces(self.config, stage)

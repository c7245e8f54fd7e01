"""Tensor parallelism's pieces (regions, embedding, block, head, shards) compute what their dense counterparts compute."""
import numpy as np
import pytest

from ringpipe.model.nn import ops
from ringpipe.model.gpt2.config import GPTConfig, init_params
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.parallel.tensor_parallel import tensor_parallel_communications as regions
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.parallel.stage import Stage
from ringpipe.model.parallel.tensor_parallel.layers import vocab_parallel_cross_entropy_forward
from ringpipe.model.parallel.tensor_parallel.sharding import assemble_full_params, shard, shard_table

TOLERANCE = dict(rtol=1e-7, atol=1e-9)


# ---- the communication regions ------------------------------------------------------------------------------
def run_region(comm, name):
    """Forward and backward of one region on rank-dependent inputs; the driver checks them."""
    region = getattr(regions, name)
    rng = np.random.default_rng(comm.rank)
    x, dy = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    if name in ("copy_to_tensor_parallel_region", "scatter_to_sequence_parallel_region"):
        x = np.random.default_rng(99).normal(size=(2, 4, 3))  # these take a replicated input
    if name in ("gather_from_sequence_parallel_region", "scatter_to_sequence_parallel_region"):
        dy = dy if name == "gather_from_sequence_parallel_region" else dy[:, :4 // comm.size]
        x = x if name == "scatter_to_sequence_parallel_region" else x[:, :4 // comm.size]
    if name == "reduce_scatter_to_sequence_parallel_region":
        dy = dy[:, :4 // comm.size]
    return x, dy, region.forward(x.copy(), comm), region.backward(dy.copy(), comm)


def test_regions_do_what_their_names_say_forward_and_backward(local_cluster):
    cluster = local_cluster(2)

    def run(name):
        return cluster.run(run_region, name)

    def concat(arrays):
        return np.concatenate(arrays, axis=1)

    halves = [slice(0, 2), slice(2, 4)]
    r = run("copy_to_tensor_parallel_region")  # identity / all-reduce
    for x, dy, out, dx in r:
        np.testing.assert_array_equal(out, x)
        np.testing.assert_allclose(dx, r[0][1] + r[1][1])
    r = run("reduce_from_tensor_parallel_region")  # all-reduce / identity
    for x, dy, out, dx in r:
        np.testing.assert_allclose(out, r[0][0] + r[1][0])
        np.testing.assert_array_equal(dx, dy)
    r = run("gather_from_sequence_parallel_region")  # all-gather / reduce-scatter along the sequence
    for rank, (x, dy, out, dx) in enumerate(r):
        np.testing.assert_array_equal(out, concat([r[0][0], r[1][0]]))
        np.testing.assert_allclose(dx, (r[0][1] + r[1][1])[:, halves[rank]])
    r = run("reduce_scatter_to_sequence_parallel_region")  # reduce-scatter / all-gather
    for rank, (x, dy, out, dx) in enumerate(r):
        np.testing.assert_allclose(out, (r[0][0] + r[1][0])[:, halves[rank]])
        np.testing.assert_array_equal(dx, concat([r[0][1], r[1][1]]))
    r = run("scatter_to_sequence_parallel_region")  # split / all-gather
    for rank, (x, dy, out, dx) in enumerate(r):
        np.testing.assert_array_equal(out, x[:, halves[rank]])
        np.testing.assert_array_equal(dx, concat([r[0][1], r[1][1]]))


# ---- each parallel piece against its dense counterpart ------------------------------------------------------
PIECES = {"embedding": (True, False, range(0)), "block": (False, False, range(1, 2)), "head": (False, True, range(0)),
          "model": (True, True, range(2))}
SEED = 1234


def piece_config(vocab_size=65, dropout=0.0, recompute=False, **options):
    return GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=8, vocab_size=vocab_size, dropout=dropout,
                     dtype="float64", recompute=recompute, **options)


def piece_data(config):
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, config.vocab_size, (2, 8)), rng.integers(0, config.vocab_size, (2, 8))
    targets[0, 3] = -1  # an ignored position
    return idx, targets, rng.normal(size=(2, 8, 16)), rng.normal(size=(2, 8, 16))


def run_piece(comm, piece, sequence_parallel, vocab_size, dropout, recompute=False, options=None):
    """One tensor-parallel Stage (a piece of the model) forward + backward on fixed data."""
    config = piece_config(vocab_size, dropout, recompute, **(options or {}))
    idx, targets, x, dout = piece_data(config)
    first, last, layers = PIECES[piece]
    stage = Stage(GPT2ParallelPlan(config), init_params(config, 3), layers, first, last, comm, sequence_parallel)
    mine = regions.sequence_slice(8, comm) if sequence_parallel else slice(None)
    out, caches = stage.forward(idx if first else x[:, mine], targets if last else None, SEED)
    dx, deferred = stage.backward_input(caches, 1.0 if last else dout[:, mine])
    stage.backward_weight(deferred)
    stage.finalize_grads()
    return out, dx, stage.grads, stage.shard_table()


def dense_piece(piece, vocab_size, dropout, **options):
    config = piece_config(vocab_size, dropout, **options)
    idx, targets, x, dout = piece_data(config)
    gpt = GPT(config, params=init_params(config, 3))
    if piece == "embedding":
        out, cache = gpt.embedding_forward(idx, SEED)
        return out, None, gpt.embedding_backward(cache, dout)[1]
    if piece == "block":
        out, cache = gpt.block_forward(1, x, SEED)
        return (out, *gpt.block_backward(1, cache, dout))
    if piece == "head":
        out, cache = gpt.head_forward(x, targets)
        return (out, *gpt.head_backward(cache, 1.0))
    loss, grads = gpt.loss_and_grads(idx, targets, dropout_seed=SEED)
    return loss, None, grads


def joined(values, sequence_parallel):
    """Every rank's (B, T/tp, C) shard in sequence order, or the one replicated value."""
    if values[0] is None or np.ndim(values[0]) == 0 or not sequence_parallel:
        for value in values[1:]:
            np.testing.assert_array_equal(value, values[0])  # replicated outputs agree bitwise
        return values[0]
    return np.concatenate(values, axis=1)


@pytest.mark.parametrize("piece", list(PIECES))
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_parallel_piece_equals_dense_outputs_and_all_gradients(local_cluster, piece, sequence_parallel):
    dropout = 0.2 if piece != "head" else 0.0  # masks are slices of the dense model's masks
    results = local_cluster(2).run(run_piece, piece, sequence_parallel, 65, dropout)
    expected_out, expected_dx, expected_grads = dense_piece(piece, 65, dropout)
    np.testing.assert_allclose(joined([r[0] for r in results], sequence_parallel), expected_out, **TOLERANCE)
    if expected_dx is not None:
        np.testing.assert_allclose(joined([r[1] for r in results], sequence_parallel), expected_dx, **TOLERANCE)
    grads = assemble_full_params([r[2] for r in results], [r[3] for r in results])
    assert sorted(grads) == sorted(expected_grads)
    for name, g in expected_grads.items():
        np.testing.assert_allclose(grads[name], g, **TOLERANCE, err_msg=name)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocabulary_of_65_padded_for_tp_gives_the_dense_loss_and_gradients(local_cluster, tp):
    results = local_cluster(tp).run(run_piece, "model", True, 65, 0.0)
    loss, _, expected = dense_piece("model", 65, 0.0)
    assert all(abs(r[0] - loss) < 1e-12 for r in results)
    grads = assemble_full_params([r[2] for r in results], [r[3] for r in results])
    for name, g in expected.items():
        np.testing.assert_allclose(grads[name], g, **TOLERANCE, err_msg=name)
    assert all(r[2]["wte.weight"].shape == (-(-65 // tp), 16) for r in results)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_recomputed_blocks_give_the_same_gradients(local_cluster, sequence_parallel):
    results = local_cluster(2).run(run_piece, "model", sequence_parallel, 65, 0.2, True)
    loss, _, expected = dense_piece("model", 65, 0.2)
    assert results[0][0] == pytest.approx(loss, rel=1e-12)
    grads = assemble_full_params([r[2] for r in results], [r[3] for r in results])
    for name, g in expected.items():
        np.testing.assert_allclose(grads[name], g, **TOLERANCE, err_msg=name)


# GPT-2 variants from transformers' GPT2Config (see tests/test_transformers_config.py).
GPT2_OPTIONS = dict(n_inner=24, layer_norm_epsilon=0.3, scale_attn_weights=False,
                    scale_attn_by_inverse_layer_idx=True)


def test_gpt2_config_options_give_the_dense_loss_and_gradients(local_cluster):
    results = local_cluster(2).run(run_piece, "model", True, 65, 0.2, False, GPT2_OPTIONS)
    loss, _, expected = dense_piece("model", 65, 0.2, **GPT2_OPTIONS)
    assert results[0][0] == pytest.approx(loss, rel=1e-12)
    assert loss != pytest.approx(dense_piece("model", 65, 0.2)[0], rel=1e-6)  # the options matter
    grads = assemble_full_params([r[2] for r in results], [r[3] for r in results])
    for name, g in expected.items():
        np.testing.assert_allclose(grads[name], g, **TOLERANCE, err_msg=name)


def block_cache_bytes(comm, sequence_parallel, dropout):
    config = piece_config(dropout=dropout)
    x = piece_data(config)[2]
    stage = Stage(GPT2ParallelPlan(config), init_params(config, 3), range(2), False, False, comm, sequence_parallel)
    mine = regions.sequence_slice(8, comm) if sequence_parallel else slice(None)
    return stage.memory.nbytes(stage.pieces.block_forward(1, x[:, mine], SEED)[1])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_with_sequence_parallelism_each_rank_caches_a_tp_th_of_a_blocks_activations(local_cluster, dropout):
    config = piece_config(dropout=dropout)
    gpt = GPT(config, params=init_params(config, 3))
    dense = gpt.memory.nbytes(gpt.block_forward(1, piece_data(config)[2], SEED)[1])
    # Every cached activation is split along the sequence or the hidden axis: the column-parallel
    # linears keep their input's local positions and gather them again for the weight gradient.
    assert local_cluster(2).run(block_cache_bytes, True, dropout) == [dense // 2] * 2
    assert all(nbytes > dense // 2 for nbytes in local_cluster(2).run(block_cache_bytes, False, dropout))


class _OneRank:
    size, rank = 1, 0

    def all_reduce(self, x, op="sum"):
        return x


def test_padded_logits_leave_the_cross_entropy_unchanged():
    rng = np.random.default_rng(1)
    logits, targets = rng.normal(size=(2, 3, 65)), rng.integers(0, 65, (2, 3))
    padded = np.concatenate([logits, rng.normal(size=(2, 3, 3))], axis=-1)  # garbage in the padding
    loss, _ = vocab_parallel_cross_entropy_forward(padded, targets, 0, 65, _OneRank())
    assert loss == pytest.approx(ops.cross_entropy_forward(logits, targets)[0], rel=1e-12)


def test_shards_of_every_parameter_reassemble_to_the_full_model():
    config = piece_config()
    full = init_params(config, 0)
    for tp in (1, 2, 4):
        plan = GPT2ParallelPlan(config)
        shardings = {name: plan.sharding(name) for name in full}
        per_rank = [{name: shard(value, shardings[name], r, tp) for name, value in full.items()} for r in range(tp)]
        tables = [shard_table(shardings, {name: value.shape for name, value in full.items()}, r, tp)
                   for r in range(tp)]
        got = assemble_full_params(per_rank, tables)
        for name, value in full.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name} tp={tp}")


def test_each_rank_holds_its_heads_q_k_and_v_columns():
    config = piece_config()
    w = init_params(config, 0)["h.0.attn.c_attn.weight"]  # (16, 48): [q | k | v], 4 heads of 4
    mine = shard(w, GPT2ParallelPlan(config).sharding("h.0.attn.c_attn.weight"), 1, 2)
    np.testing.assert_array_equal(mine, np.concatenate([w[:, 8:16], w[:, 24:32], w[:, 40:48]], axis=1))

"""T5 in ringpipe: the whole model's float64 gradient against finite differences, config refusals."""
import numpy as np
import pytest

from ringpipe.model.t5.config import T5Config
from ringpipe.model.t5.model import T5, shift_right

TINY = dict(vocab_size=23, d_model=8, d_kv=3, d_ff=10, num_layers=2, num_decoder_layers=2,
            num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=12,
            dtype="float64")


@pytest.mark.parametrize("feed_forward_proj,dropout_seed", [("relu", None), ("gated-gelu", 5)])
def test_the_whole_t5_gradient_matches_finite_differences_in_float64(feed_forward_proj, dropout_seed):
    model = T5(T5Config(**TINY, feed_forward_proj=feed_forward_proj, dropout_rate=0.2), seed=1)
    rng = np.random.default_rng(0)
    ids, labels = rng.integers(0, 23, (2, 7)), rng.integers(0, 23, (2, 5))
    labels[0, 4] = -100
    mask = np.ones((2, 7))
    mask[1, 5:] = 0

    def loss():  # the forward of seq2seq_loss_and_grads alone; with a seed, the same dropout masks
        decoder_ids = shift_right(labels, model.config.decoder_start_token_id, model.config.pad_token_id)
        encoder_out, encoder_cache = model.encode(ids, mask, dropout_seed)
        y, decoder_cache = model.decode(decoder_ids, encoder_out, mask, dropout_seed)
        model._release(encoder_cache), model._release(decoder_cache)
        return model.head_forward(y, labels)[0]

    first, grads = model.seq2seq_loss_and_grads(ids, labels, mask, dropout_seed=dropout_seed)
    assert loss() == first  # the finite differences below see the loss the gradients are of
    step = 1e-6
    for name, param in model.params.items():  # two entries of every parameter
        for index in [tuple(rng.integers(0, n) for n in param.shape) for _ in range(2)]:
            saved = param[index]
            param[index] = saved + step
            plus = loss()
            param[index] = saved - step
            minus = loss()
            param[index] = saved
            # the loss (~3) is exact to ~1e-16, so the central difference is to ~1e-9
            assert abs((plus - minus) / (2 * step) - grads[name][index]) < 2e-8, (name, index)


def test_dropout_masks_are_a_function_of_the_seed_and_off_without_one():
    model = T5(T5Config(**TINY, dropout_rate=0.3), seed=1)
    ids, labels = np.array([[3, 4, 5, 6, 7]]), np.array([[8, 9, 10]])
    clean = model.seq2seq_loss_and_grads(ids, labels)[0]
    dropped = model.seq2seq_loss_and_grads(ids, labels, dropout_seed=1)[0]
    assert dropped != clean and dropped == model.seq2seq_loss_and_grads(ids, labels, dropout_seed=1)[0]
    assert model.seq2seq_loss_and_grads(ids, labels, dropout_seed=2)[0] != dropped


def test_teacher_forcing_shifts_labels_right_after_the_start_token():
    labels = np.array([[5, 6, 7], [8, -100, -100]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6], [0, 8, 0]]


def test_the_decoder_reads_the_encoder_output_through_cross_attention():
    model = T5(T5Config(**TINY), seed=2)
    ids, decoder_ids = np.array([[3, 4, 5, 6]]), np.array([[0, 7, 8]])
    changed = ids.copy()
    changed[0, 0] = 9
    assert not np.allclose(model.decoder_logits(ids, decoder_ids), model.decoder_logits(changed, decoder_ids))
    prefix = model.decoder_logits(ids, decoder_ids[:, :2])  # causal: later decoder tokens do not matter
    np.testing.assert_allclose(model.decoder_logits(ids, decoder_ids)[:, :2], prefix, rtol=1e-12)


def test_a_token_outside_the_vocabulary_is_refused_by_value():
    model = T5(T5Config(**TINY))
    with pytest.raises(IndexError, match="outside the vocabulary of 23"):
        model.decoder_logits(np.array([[1, 23]]), np.array([[0]]))


def test_greedy_decoding_with_kv_caches_equals_rerunning_the_whole_decoder():
    model = T5(T5Config(**{**TINY, "num_decoder_layers": 3}, eos_token_id=None), seed=4)
    ids = np.random.default_rng(1).integers(0, 23, (2, 9))
    mask = np.ones((2, 9))
    mask[0, 6:] = 0
    out = model.generate(ids, 14, attention_mask=mask)
    reference = np.zeros((2, 1), dtype=np.int64)
    for _ in range(14):  # no cache: the whole decoder over every token so far
        logits = model.decoder_logits(ids, reference, mask)[:, -1]
        reference = np.concatenate([reference, logits.argmax(-1)[:, None]], axis=1)
    assert out.tolist() == reference.tolist()


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = T5(T5Config(**TINY), seed=4)
    ids = np.array([[3, 4, 5]])
    first = int(model.decoder_logits(ids, np.zeros((1, 1), dtype=np.int64))[0, -1].argmax())
    model.config.eos_token_id = first
    assert model.generate(ids, 10).tolist() == [[0, first]]


def test_every_cached_activation_is_counted_and_released():
    model = T5(T5Config(**TINY), seed=1)
    ids, labels = np.array([[3, 4, 5, 6]]), np.array([[7, 8]])
    model.seq2seq_loss_and_grads(ids, labels)
    model.decoder_logits(ids, labels)
    model.generate(ids, 3)
    assert model.memory.peak_bytes > 0 and model.memory.live_bytes == 0

"""The default pipeline split balances parameter bytes, the embedding and the head included."""
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.parallel_plan import GPT2ParallelPlan
from ringpipe.model.parallel.pipeline_parallel.schedules import split_layers
from ringpipe.model.training.layout_report import describe_layout, stage_parameter_elements
from ringpipe.model.training.parallel_trainer import Layout

GPT2_MEDIUM = GPT2ParallelPlan(GPTConfig(n_layer=24, n_embd=1024, n_head=16, block_size=256, vocab_size=50257))


def counts(ranges):
    return [len(r) for r in ranges]


def stage_sizes_of(counts_, sizes, first, last):
    bounds = [0, *itertools.accumulate(counts_)]
    return [sum(sizes[bounds[k]:bounds[k + 1]]) + (first if k == 0 else 0) + (last if k == len(counts_) - 1 else 0)
            for k in range(len(counts_))]


def test_a_heavy_embedding_takes_blocks_off_the_first_stage():
    assert counts(split_layers(4, 2, layer_sizes=[10] * 4, first_size=20)) == [1, 3]
    assert counts(split_layers(24, 4, layer_sizes=[12] * 24, first_size=50, last_size=50)) == [4, 8, 8, 4]


def test_equal_blocks_without_embedding_split_as_the_count_balanced_default():
    for n, stages in ((12, 4), (7, 3), (5, 2), (9, 9)):
        assert split_layers(n, stages, layer_sizes=[1] * n) == split_layers(n, stages)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 8))
def test_the_size_balanced_split_minimises_the_largest_stage(data, n):
    stages = data.draw(st.integers(1, n))
    sizes = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    first, last = data.draw(st.integers(0, 40)), data.draw(st.integers(0, 40))
    got = counts(split_layers(n, stages, layer_sizes=sizes, first_size=first, last_size=last))
    assert len(got) == stages and sum(got) == n and min(got) >= 1
    best = min(max(stage_sizes_of([b - a for a, b in zip((0, *cuts), (*cuts, n))], sizes, first, last))
               for cuts in itertools.combinations(range(1, n), stages - 1))
    assert max(stage_sizes_of(got, sizes, first, last)) == best


def test_gpt2_medium_stages_carry_near_equal_weights_and_adam_moments_at_pp2_and_pp4():
    tied = GPT2_MEDIUM.param_shapes()["wte.weight"]
    for pp in (2, 4):
        _, elements = stage_parameter_elements(GPT2_MEDIUM, Layout(pp=pp))
        # weights and two moments; the last stage holds the tied wte without its moments
        state = [3 * e for e in elements[:-1]] + [3 * elements[-1] - 2 * tied[0] * tied[1]]
        mean = sum(state) / pp
        assert all(abs(s - mean) <= 0.1 * mean for s in state), (pp, state)


def test_an_explicit_split_is_kept():
    ranges, _ = stage_parameter_elements(GPT2_MEDIUM, Layout(pp=2, split=[20, 4]))
    assert counts(ranges) == [20, 4]


def test_the_layout_report_states_the_split_and_bytes_per_stage_and_rank():
    line = describe_layout(GPT2_MEDIUM, Layout(tp=2, pp=4), "float32")
    assert "blocks per stage 3,8,7,6 (balanced by weight and AdamW bytes)" in line
    assert ("parameters per stage 341.47, 384.41, 336.36, 484.63 MiB (float32), "
            "per rank 170.73, 192.20, 168.18, 242.31 MiB") in line
    # 4 bytes × 4 per element, but the last rank keeps no moments for its half of wte (2 × 98.16 MiB)
    assert "weights + gradients + AdamW per rank 682.94, 768.81, 672.71, 772.94 MiB" in line
    assert "one process would need 5.28 GiB" in line

"""Generation across workers (model/inference/): the same tokens as one process, whatever the layout."""
import dataclasses

import numpy as np
import pytest

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.inference.parallel_generator import ParallelGenerator
from ringpipe.model.inference.pipelined_generation import generate_in_one_process, merge_generations, rank_tasks
from ringpipe.model.inference.sampling import StepUniforms, prompt_microbatches
from ringpipe.model.inference.weights import weights_source
from ringpipe.model.training.parallel_trainer import Layout, ParallelTrainer
from ringpipe.model.training.sharded_checkpoint import load_consolidated, save_sharded_checkpoint
from ringpipe.model.training.trainer import Trainer
from tests.conftest import one_error_line, run_cli
from tests.test_parallel_equivalence import config_for

CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=16, block_size=8, vocab_size=37, dtype="float64")
PROMPTS = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
NEW = 10  # past block_size 8: the cache is refilled with the last 8 tokens, as one process does
GREEDY, TOP_K = dict(temperature=0), dict(temperature=0.9, top_k=5)


def test_prompt_microbatches_are_contiguous_groups_of_equal_length():
    assert prompt_microbatches([3, 3, 3, 3], 2) == [[0, 1], [2, 3]]
    assert prompt_microbatches([3, 3, 5, 5, 5], 2) == [[0, 1], [2], [3, 4]]
    assert prompt_microbatches([2], 4) == [[0]]


def test_step_uniforms_are_one_draw_per_step_for_all_prompts_whatever_the_split():
    rng = np.random.default_rng(7)
    whole = [rng.random((5, 1)) for _ in range(3)]
    uniforms = StepUniforms(7, 5)
    for step in range(3):
        np.testing.assert_array_equal(uniforms.rows(step, [3, 4]), whole[step][3:])
        np.testing.assert_array_equal(uniforms.rows(step, [0, 1, 2]), whole[step][:3])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    GPT(CONFIG, seed=3).save_pretrained(str(directory))
    return str(directory)


def reference(prompts, **sampling):
    """One process, one batch: GPT.generate (model/gpt2/generation.py)."""
    return GPT(CONFIG, seed=3).generate(np.array(prompts), NEW, seed=5, **sampling)[:, len(prompts[0]):].tolist()


@pytest.mark.parametrize("sampling", [GREEDY, TOP_K], ids=["greedy", "top-k"])
def test_one_process_generation_of_prompt_microbatches_equals_batched_generate(sampling):
    got = generate_in_one_process(GPT(CONFIG, seed=3), PROMPTS, NEW, seed=5, **sampling)["tokens"]
    assert [got[i] for i in range(len(PROMPTS))] == reference(PROMPTS, **sampling)


def test_prompts_of_different_lengths_are_each_continued_as_alone():
    prompts = [[1, 2], [3, 4, 5, 6], [7]]
    got = generate_in_one_process(GPT(CONFIG, seed=3), prompts, NEW, **GREEDY)["tokens"]
    assert [got[i] for i in range(3)] == [reference([p], **GREEDY)[0] for p in prompts]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(tp=2, pp=2), dict(dp=2)],
                         ids=["tp2", "pp2", "tp2xpp2", "dp2"])
@pytest.mark.parametrize("sampling", [GREEDY, TOP_K], ids=["greedy", "top-k"])
def test_generation_under_a_layout_equals_one_process(local_cluster, model_dir, layout, sampling):
    world = int(np.prod(list(layout.values())))
    generators = local_cluster(world).spawn(ParallelGenerator, weights_source(model_dir), layout)
    got = merge_generations(generators.generate(PROMPTS, NEW, seed=5, **sampling).result())["tokens"]
    assert [got[i] for i in range(len(PROMPTS))] == reference(PROMPTS, **sampling)


@pytest.mark.timeout(120)
def test_pipeline_stages_take_prompts_of_different_lengths_in_flight(local_cluster, model_dir):
    prompts = [[1, 2], [3, 4, 5, 6], [7], [8, 9]]
    generators = local_cluster(2).spawn(ParallelGenerator, weights_source(model_dir), {"pp": 2})
    got = merge_generations(generators.generate(prompts, NEW, seed=5, microbatches=4, **TOP_K).result())
    expected = generate_in_one_process(GPT(CONFIG, seed=3), prompts, NEW, seed=5, **TOP_K)
    assert got["tokens"] == expected["tokens"]
    assert sorted(got["first_token_s"]) == [0, 1, 2, 3]


@pytest.mark.timeout(120)
def test_each_rank_holds_only_its_shards(local_cluster, model_dir):
    generators = local_cluster(4).spawn(ParallelGenerator, weights_source(model_dir), {"tp": 2, "pp": 2})
    whole = sum(p.nbytes for p in GPT(CONFIG, seed=3).params.values())
    held = generators.weight_bytes().result()
    assert max(held) < 0.45 * whole, (held, whole)  # a quarter of the blocks, half the embedding


@pytest.mark.timeout(120)
def test_each_rank_checks_the_model_file_against_the_config_as_it_reads(local_cluster, model_dir, tmp_path):
    from ringpipe.runtime import RemoteError
    from ringpipe.runtime.files import load_tensors, save_tensors

    source = weights_source(model_dir)  # checked by the driver; the file then changes under it
    tensors, metadata = load_tensors(f"{model_dir}/model.safetensors")
    save_tensors(tmp_path / "model.safetensors", {**tensors, "transformer.h.0.attn.c_attn.weight_scale":
                                                  np.ones(48, np.float32)}, metadata)
    with pytest.raises(RemoteError, match="unexpected \\['h.0.attn.c_attn.weight_scale'\\]"):
        local_cluster(2).spawn(ParallelGenerator, {**source, "path": str(tmp_path)}, {"pp": 2})


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, local_cluster_pool):
    """A ParallelTrainer after one step, two pipeline stages on each of its two ranks (interleaved), and the
    sharded checkpoint it wrote."""
    tmp = tmp_path_factory.mktemp("sharded")
    config = config_for(tmp, n_layer=4, n_head=2)
    run = str(tmp / "run")
    setup = Trainer.create(config, run)
    layout = Layout(pp=2, schedule="interleaved", virtual_stages=2)
    trainers = local_cluster_pool.get(2).spawn(ParallelTrainer, dataclasses.asdict(config), dataclasses.asdict(layout),
                                               str(tmp / "run" / "tokens.bin"), setup.tokenizer.vocab_size)
    trainers.train_step(0).result()
    save_sharded_checkpoint(trainers, run, 1, config=dataclasses.asdict(config),
                            model=config.model_config(setup.tokenizer.vocab_size), layout=dataclasses.asdict(layout),
                            tokenizer=setup.tokenizer)
    return trainers, run


def dense_from(checkpoint_run):
    config, params, _ = load_consolidated(weights_source(checkpoint_run)["path"])
    return GPT(config, params=params)


@pytest.mark.timeout(120)
def test_ranks_read_their_shards_of_a_sharded_checkpoint_saved_under_another_layout(local_cluster, sharded_run):
    _, run = sharded_run
    generators = local_cluster(2).spawn(ParallelGenerator, weights_source(run), {"tp": 2})
    got = merge_generations(generators.generate(PROMPTS, NEW, seed=5, **TOP_K).result())["tokens"]
    expected = dense_from(run).generate(np.array(PROMPTS), NEW, seed=5, **TOP_K)[:, 3:].tolist()
    assert [got[i] for i in range(len(PROMPTS))] == expected


@pytest.mark.timeout(120)
def test_a_trainer_generates_with_its_own_stages(sharded_run):
    trainers, run = sharded_run  # the end-of-training --sample of a multi-worker run (here 4 stages on 2 ranks)
    got = merge_generations(trainers.generate(PROMPTS[:1], NEW, seed=5).result())["tokens"][0]
    assert got == dense_from(run).generate(np.array(PROMPTS[:1]), NEW, seed=5)[0, 3:].tolist()


@pytest.mark.timeout(120)
def test_generate_command_across_workers_prints_what_one_process_prints(sharded_run):
    _, run = sharded_run
    flags = ["generate", "--checkpoint", run, "--prompt", "1 lit", "--prompt", "2 pigs", "--max-new-tokens", "6",
             "--top-k", "4"]
    alone = run_cli(*flags)
    assert alone.exit_code == 0, alone.output
    assert alone.output.count("---") == 1
    split = run_cli(*flags, "--nproc", "2", "--pp", "2")
    assert split.exit_code == 0, split.output
    assert split.output == alone.output


@pytest.mark.parametrize("flags,message", [
    (["--nproc", "2", "--tp", "3"], "--nproc"),
    (["--nproc", "3", "--tp", "3"], "n_head 4 is not divisible by tp 3"),
    (["--nproc", "8", "--pp", "8"], "4 layers cannot fill 8 stages"),
    (["--microbatches", "2"], "--microbatches"),
], ids=["nproc", "heads", "layers", "microbatches"])
def test_a_layout_that_cannot_split_the_model_is_one_line_before_workers_start(model_dir, flags, message):
    assert message in one_error_line(run_cli("generate", "--checkpoint", model_dir, *flags))


@pytest.mark.parametrize("name,message", [("t5", "supports gpt2 models; {path} holds a t5 model"),
                                          ("bert", "{path} holds a bert model, which does not generate text")])
def test_a_family_that_cannot_generate_across_workers_is_refused_by_name(tmp_path, name, message):
    from ringpipe.model.families import family

    model_family = family(name)
    config = model_family.config(**dataclasses.asdict(model_family.default_options()), vocab_size=40)
    model_family.model(config, seed=0).save_pretrained(str(tmp_path))
    line = one_error_line(run_cli("generate", "--checkpoint", tmp_path, "--nproc", "2", "--pp", "2"))
    assert message.format(path=tmp_path) in line


def busy_fraction(pp: int, microbatches: int, steps: int = 12) -> float:
    """Each rank's tasks (rank_tasks, one stage per rank) run with unit cost, each as soon as its input
    exists: the fraction of the last stage's time from its first task to its last that it is busy."""
    done = {}  # (step, micro-batch, stage) -> finish time
    free = [0] * pp
    queues = [rank_tasks([rank], microbatches, steps) for rank in range(pp)]
    while any(queues):
        for rank in range(pp):
            if not queues[rank]:
                continue
            step, mb, stage = queues[rank][0]
            source = (step, mb, stage - 1) if stage else (step - 1, mb, pp - 1) if step else None
            if source is not None and source not in done:
                continue
            queues[rank].pop(0)
            start = max(free[rank], done.get(source, 0))
            done[(step, mb, stage)] = free[rank] = start + 1
    last = [time for (step, mb, stage), time in done.items() if stage == pp - 1]
    return len(last) / (max(last) - min(last) + 1)


@pytest.mark.parametrize("pp", [2, 4])
def test_with_as_many_prompt_groups_as_stages_no_stage_waits_by_design(pp):
    assert busy_fraction(pp, microbatches=pp) == 1.0
    assert busy_fraction(pp, microbatches=1) == pytest.approx(1 / pp, rel=0.2)  # one group: a stage at a time

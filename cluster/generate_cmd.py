"""`ringpipe generate`: continue prompts with a trained model (a run directory or a model directory),
in this process or split over worker processes (--nproc, --tp, --pp)."""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import SEED, FiniteFloat, bad_flag, check_device, one_line, usage_error
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.families import FAMILIES, checkpoint_family, family
from ringpipe.model.inference.kv_cache import supports_cached_generation
from ringpipe.model.inference.pipelined_generation import generate_in_one_process
from ringpipe.model.inference.weights import GENERATES_ACROSS_WORKERS, load_whole_model, locate_weights, weights_source
from ringpipe.model.training.checkpoint_integrity import fallback_hint
from ringpipe.model.training.run_dir import SHARDED_CHECKPOINTS_DIR
from ringpipe.runtime.array_module import array_module, to_host

SEPARATOR = "---"  # between the continuations of several prompts


@click.command(short_help="Continue a prompt with a trained model.")
@click.option("--checkpoint", "directory", required=True, type=click.Path(),
              help="A run directory (--out of train), a sharded checkpoint or a model directory.")
@click.option("--prompt", "prompts", multiple=True, default=["\n"], show_default=True,
              help="Text to continue; repeat for several prompts (printed in order, separated by a "
                   f"{SEPARATOR} line).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=1.0, show_default=True,
              help="Softmax temperature of sampling; 0 decodes greedily (the most likely token each step, "
                   "--seed then does nothing).")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes holding the model between them; dp × tp × pp (GPT-2 models).")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel size: attention heads (and their KV cache) split over this many workers.")
@click.option("--pp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Pipeline stages: the blocks split over this many workers.")
@click.option("--dp", type=click.IntRange(min=1), default=None,
              help="Replicas, each generating a share of the prompts [default: nproc / (tp × pp)].")
@click.option("--microbatches", type=click.IntRange(min=1), default=None,
              help="Groups of a replica's prompts in flight through the stages [default: pp].")
def generate(directory, prompts, max_new_tokens, temperature, top_k, seed, device, nproc, tp, pp, dp, microbatches):
    """Continue each --prompt with a trained model and print the texts."""
    if not os.path.isdir(directory):
        raise bad_flag("--checkpoint", f"directory {directory!r} does not exist")
    if any(not prompt for prompt in prompts):
        raise bad_flag("--prompt", "must not be empty")
    check_device(device)
    try:
        located = locate_weights(directory)
    except ValueError as exc:  # no model and no checkpoint there: the flag is wrong (a damaged one is found below)
        raise bad_flag("--checkpoint", one_line(exc)) from None
    held = checkpoint_family(located)
    if held in FAMILIES and not hasattr(family(held).model, "generate"):  # an encoder (BERT) predicts masked tokens
        raise bad_flag("--checkpoint", f"{located} holds a {held} model, which does not generate text "
                                       "(ringpipe fill-mask predicts its masked tokens)")
    if nproc > 1 and held in FAMILIES and held not in GENERATES_ACROSS_WORKERS:
        raise bad_flag("--nproc", f"generation across workers supports {', '.join(GENERATES_ACROSS_WORKERS)} "
                                  f"models; {located} holds a {held} model (leave out --nproc)")
    dp = _data_parallel(nproc, tp, pp, dp)
    if nproc > 1 or microbatches is not None:
        if nproc == 1:
            raise bad_flag("--microbatches", "needs --nproc 2 or more (they flow through pipeline stages)")
        _generate_across_workers(directory, prompts, max_new_tokens, temperature, top_k, seed, device,
                                 (dp, tp, pp), microbatches)
        return
    try:
        path = locate_weights(directory)  # in a run stopped before its end, its newest checkpoint
        tokenizer = load_tokenizer(path)
        gpt = load_whole_model(path, device)
    except Exception as exc:  # any reader error means the same thing to the user
        raise _cannot_load(directory, one_line(exc)) from None
    directory = path
    if not hasattr(gpt, "generate"):  # an encoder (BERT) predicts masked tokens instead
        raise bad_flag("--checkpoint", f"{directory} holds a {checkpoint_family(directory)} model, which does not "
                                       "generate text (ringpipe fill-mask predicts its masked tokens)")
    ids = _encode(tokenizer, prompts)
    if getattr(gpt, "is_encoder_decoder", False):  # T5: the prompt is the encoder's input
        if len(ids) > 1:
            raise bad_flag("--prompt", f"{directory} holds a {checkpoint_family(directory)} model; give one --prompt")
        xp = array_module(device)
        eos = gpt.config.eos_token_id
        out = to_host(gpt.generate(xp.asarray(list(ids[0]) + ([] if eos is None else [eos]))[None, :],
                                   max_new_tokens, temperature=temperature, top_k=top_k,
                                   seed=seed))[0, 1:].tolist()  # after the start token
        click.echo(tokenizer.decode(out[:out.index(eos)] if eos in out else out))
        return
    if not supports_cached_generation(gpt):
        raise bad_flag("--checkpoint", f"{directory} holds a model that cannot generate with a KV cache")
    result = generate_in_one_process(gpt, ids, max_new_tokens, temperature, top_k, seed)
    _print(tokenizer, ids, result["tokens"])


def _data_parallel(nproc: int, tp: int, pp: int, dp: int | None) -> int:
    if dp is None:
        if nproc % (tp * pp):
            raise bad_flag("--nproc", f"{nproc} is not a multiple of tp {tp} × pp {pp}")
        return nproc // (tp * pp)
    if dp * tp * pp != nproc:
        raise bad_flag("--nproc", f"{nproc} must equal dp {dp} × tp {tp} × pp {pp} = {dp * tp * pp}")
    return dp


def _encode(tokenizer, prompts) -> list:
    try:
        return [tokenizer.encode(prompt) for prompt in prompts]
    except ValueError as exc:
        raise bad_flag("--prompt", one_line(exc)) from None


def _print(tokenizer, ids: list, generated: dict) -> None:
    for i, prompt in enumerate(ids):
        if i:
            click.echo(SEPARATOR)
        click.echo(tokenizer.decode(list(prompt) + list(generated[i])))


def _generate_across_workers(directory, prompts, max_new_tokens, temperature, top_k, seed, device, layout,
                             microbatches) -> None:
    from ringpipe.model.inference.distributed_generator import DistributedGenerator, check_generation_layout
    from ringpipe.runtime import RemoteError, WorkerLost

    try:
        source = weights_source(directory, device)
    except Exception as exc:  # any reader error means the same thing to the user
        raise _cannot_load(directory, one_line(exc)) from None
    try:
        check_generation_layout(source, *layout)
    except ValueError as exc:  # the layout flags do not fit the model
        raise usage_error(one_line(exc)) from None
    try:
        tokenizer = load_tokenizer(source["path"])
    except Exception as exc:
        raise click.ClickException(f"cannot load model from {directory}: {one_line(exc)}") from None
    ids = _encode(tokenizer, prompts)
    try:
        with DistributedGenerator(source, *layout) as generator:
            result = generator.generate(ids, max_new_tokens, temperature, top_k, seed, microbatches)
    except (RemoteError, WorkerLost) as exc:  # the cause's first line; its remote traceback is in the rank's log
        cause = str(exc).splitlines()[0].rstrip(". ") if str(exc) else type(exc).__name__
        raise click.ClickException(f"generating from {source['path']} on {layout[0] * layout[1] * layout[2]} "
                                   f"workers failed: {cause}{_fallback(source['path'], cause)}") from None
    _print(tokenizer, ids, result["tokens"])


def _cannot_load(directory: str, cause: str) -> click.ClickException:
    return click.ClickException(f"cannot load model from {directory}: {cause}{_fallback(directory, cause)}")


def _fallback(directory: str, cause: str) -> str:
    """Which older checkpoint of the run is intact, when `cause` says its latest (`directory` names the run or
    that checkpoint) is damaged; "" otherwise (model/training/checkpoint_integrity.py)."""
    parent = os.path.dirname(os.path.normpath(directory))
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == SHARDED_CHECKPOINTS_DIR else directory
    return fallback_hint(run_dir, cause, "generate from it")

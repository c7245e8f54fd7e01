"""`ringpipe generate`: continue a prompt with a trained model (a run directory or a model directory)."""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import FiniteFloat, bad_flag, one_line
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.families import DEFAULT_FAMILY, checkpoint_family, family
from ringpipe.model.quantization.gpt2_int8 import Int8GPT
from ringpipe.model.quantization.int8_format import quantization_config
from ringpipe.model.training.run_dir import CHECKPOINT_DIR, CONFIG_FILE
from ringpipe.runtime.array_module import array_module, to_host


@click.command(short_help="Continue a prompt with a trained model.")
@click.option("--checkpoint", "directory", required=True, type=click.Path(),
              help="A run directory (--out of train) or a model directory.")
@click.option("--prompt", default="\n", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0, min_open=True), default=1.0,
              show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
def generate(directory, prompt, max_new_tokens, temperature, top_k, seed, device):
    """Continue --prompt with a trained model and print the text."""
    if not os.path.isdir(directory):
        raise bad_flag("--checkpoint", f"directory {directory!r} does not exist")
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)) and \
            os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
        directory = os.path.join(directory, CHECKPOINT_DIR)  # a run stopped before its end
    try:
        tokenizer = load_tokenizer(directory)
        model = Int8GPT if quantization_config(directory) else \
            family(checkpoint_family(directory) or DEFAULT_FAMILY).model  # an int8 model: ringpipe quantize
        gpt = model.from_pretrained(directory, device=device)
    except Exception as exc:  # any reader error means the same thing to the user
        raise click.ClickException(f"cannot load model from {directory}: {one_line(exc)}") from None
    if not hasattr(gpt, "generate"):  # an encoder (BERT) predicts masked tokens instead
        raise bad_flag("--checkpoint", f"{directory} holds a {checkpoint_family(directory)} model, which does not "
                                       "generate text (ringpipe fill-mask predicts its masked tokens)")
    if not prompt:
        raise bad_flag("--prompt", "must not be empty")
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as exc:
        raise bad_flag("--prompt", one_line(exc)) from None
    xp = array_module(device)
    if getattr(gpt, "is_encoder_decoder", False):  # T5: the prompt is the encoder's input
        eos = gpt.config.eos_token_id
        out = to_host(gpt.generate(xp.asarray(list(ids) + ([] if eos is None else [eos]))[None, :],
                                   max_new_tokens, temperature=temperature, top_k=top_k,
                                   seed=seed))[0, 1:].tolist()  # after the start token
        click.echo(tokenizer.decode(out[:out.index(eos)] if eos in out else out))
        return
    out = gpt.generate(xp.asarray(ids)[None, :], max_new_tokens, temperature=temperature,
                       top_k=top_k, seed=seed)
    click.echo(tokenizer.decode(to_host(out)[0]))

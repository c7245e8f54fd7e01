"""`ringpipe fill-mask`: the most likely tokens at each [MASK] of a text, from a trained BERT."""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import bad_flag, one_line
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.families import checkpoint_family, family
from ringpipe.model.training.run_dir import CHECKPOINT_DIR, CONFIG_FILE

FAMILY = "bert"


@click.command("fill-mask", short_help="Predict the [MASK] tokens of a text with a trained BERT.")
@click.option("--checkpoint", "directory", required=True, type=click.Path(),
              help="A run directory (--out of train --model bert) or a model directory.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True)
@click.argument("text")
def fill_mask(directory, top_k, device, text):
    """Print the --top-k most likely tokens, with probabilities, at each mask token ([MASK]) of TEXT.

    The text is encoded as `[CLS] TEXT [SEP]`, as the model was trained."""
    if not os.path.isdir(directory):
        raise bad_flag("--checkpoint", f"directory {directory!r} does not exist")
    if not os.path.exists(os.path.join(directory, CONFIG_FILE)):
        if not os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
            raise bad_flag("--checkpoint", f"{directory} holds no model ({CONFIG_FILE}) and no checkpoint "
                                           f"({CHECKPOINT_DIR}/)")
        directory = os.path.join(directory, CHECKPOINT_DIR)  # a run stopped before its end
    held = checkpoint_family(directory)
    if held not in (None, FAMILY):
        raise bad_flag("--checkpoint", f"{directory} holds a {held} model; fill-mask needs a {FAMILY} model")
    bert = family(FAMILY)
    try:
        tokenizer = load_tokenizer(directory)
        model = bert.model.from_pretrained(directory, device=device)
        special = {role: tokenizer.token_id(token) for role, token in bert.special_tokens.items()}
    except Exception as exc:  # any reader error means the same thing to the user
        raise click.ClickException(f"cannot load model from {directory}: {one_line(exc)}") from None
    mask = bert.special_tokens["mask_token"]
    try:
        ids = [special["cls_token"], *tokenizer.encode(text).tolist(), special["sep_token"]]
        if special["mask_token"] not in ids:
            raise ValueError(f"no mask token {mask} to fill")
        predictions = model.fill_mask(ids, special["mask_token"], top_k)
    except ValueError as exc:
        raise bad_flag("TEXT", one_line(exc)) from None
    for number, candidates in enumerate(predictions, start=1):
        click.echo(f"{mask} {number}:")
        for token, probability in candidates:
            click.echo(f"  {probability:.4f}  {tokenizer.decode([token])!r}")

"""`ringpipe export RUN_DIR [--out DIR]`: a run's model in Hugging Face format, from its checkpoint.

A sharded checkpoint (multi-worker runs) is streamed into `model.safetensors` a chunk at a time
(model/training/hf_export.py), so exporting never needs the memory of the model.
"""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import OutputDirectory, bad_flag, one_line, usage_error
from ringpipe.model.quantization.int8_format import quantization_config
from ringpipe.model.training.checkpoint_integrity import fallback_hint
from ringpipe.model.training.hf_export import export_checkpoint
from ringpipe.model.training.run_dir import (EXPORT_RECORD_FILE, check_export_target, export_record,
                                             find_checkpoint)


@click.command(short_help="Write a run's model (Hugging Face files) from its checkpoint.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=OutputDirectory(), default=None,
              help="Directory for model.safetensors, config.json and the tokenizer [default: RUN_DIR]: new, empty, "
                   "or an earlier export of RUN_DIR (anything else: refused).")
def export(run_dir, out):
    """Write model.safetensors, config.json and the tokenizer files of the latest checkpoint in
    RUN_DIR, streamed from its shards; transformers' GPT2LMHeadModel.from_pretrained opens them."""
    out = out or run_dir
    quantized = quantization_config(run_dir)
    if quantized is not None:  # already a model directory, and its int8 weights are not export's float ones
        raise usage_error(f"{run_dir} holds an int8 model written by ringpipe quantize: int8 directories "
                          f"cannot be exported (they are already a model directory that ringpipe "
                          f"generate reads); export the float run ({quantized.get('source')})")
    try:
        check_export_target(run_dir, out)
    except ValueError as exc:
        raise bad_flag("--out", str(exc)) from None
    try:
        checkpoint = find_checkpoint(run_dir)
    except ValueError as exc:  # RUN_DIR holds no checkpoint: the argument is wrong
        raise usage_error(one_line(exc)) from None
    try:
        # beside the files, where they came from: another run's export is never replaced by this one
        elsewhere = os.path.realpath(out) != os.path.realpath(run_dir)
        export_checkpoint(checkpoint, out, {EXPORT_RECORD_FILE: export_record(run_dir)} if elsewhere else {})
    except (ValueError, OSError) as exc:
        raise click.ClickException(one_line(exc) + fallback_hint(run_dir, one_line(exc), "export it")) from None
    click.echo(f"exported {checkpoint} to {out}", err=True)

"""`ringpipe quantize RUN_DIR --int8 [--out DIR]`: a trained run's model with int8 linear weights."""
from __future__ import annotations

import os

import click

from ringpipe.cluster.options import FiniteFloat, OutputDirectory, bad_flag, one_line
from ringpipe.model.quantization.outliers import LLM_INT8_THRESHOLD
from ringpipe.model.quantization.quantize import quantizable_source, quantize_run
from ringpipe.model.training.checkpoint_integrity import fallback_hint
from ringpipe.model.training.run_dir import check_quantize_target


@click.command(short_help="Write a run's model with int8 weights, for ringpipe generate.")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--int8", "int8", is_flag=True,
              help="int8 linear weights with a float absmax scale per output channel (the only format).")
@click.option("--out", type=OutputDirectory(), default=None,
              help="The int8 model directory [default: RUN_DIR-int8]; ringpipe generate --checkpoint reads it.")
@click.option("--per-tensor", is_flag=True,
              help="One absmax scale per weight instead of one per output channel (for comparison).")
@click.option("--outlier-threshold", type=FiniteFloat(min=0, min_open=True), default=None,
              help=f"Keep in float the input features whose activations on the run's tokens reach this "
                   f"(LLM.int8(): {LLM_INT8_THRESHOLD}) [default: none].")
@click.option("--calibration-batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="--outlier-threshold: batches of 8 training windows to find the outliers on.")
def quantize(run_dir, int8, out, per_tensor, outlier_threshold, calibration_batches):
    """Quantize the model of RUN_DIR (a run's --out, its newest checkpoint if it stopped early, or a
    model directory): each linear layer's weight as int8 with a float scale per output channel;
    embeddings, LayerNorms and biases stay float."""
    if not int8:
        raise bad_flag("--int8", "is required (int8 is the format ringpipe quantize writes)")
    if not os.path.isdir(run_dir):
        raise bad_flag("RUN_DIR", f"directory {run_dir!r} does not exist")
    try:
        quantizable_source(run_dir)
    except ValueError as exc:  # RUN_DIR holds no model int8 can quantize: the argument is wrong
        raise bad_flag("RUN_DIR", one_line(exc)) from None
    out = out or os.path.normpath(run_dir) + "-int8"
    if os.path.realpath(out) == os.path.realpath(run_dir):
        raise bad_flag("--out", f"{out} is RUN_DIR itself; the int8 model goes beside the float one")
    try:
        check_quantize_target(run_dir, out)
    except ValueError as exc:
        raise bad_flag("--out", str(exc)) from None
    try:
        summary = quantize_run(run_dir, out, "tensor" if per_tensor else "channel", outlier_threshold,
                               calibration_batches)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"cannot quantize {run_dir}: {one_line(exc)}"
                                   + fallback_hint(run_dir, one_line(exc), "quantize it")) from None
    outliers = f", {summary['outlier_rows']} outlier input rows kept in float" if outlier_threshold else ""
    click.echo(f"quantized {summary['quantized']} linear weights of {summary['source']} to int8 "
               f"({'per tensor' if per_tensor else 'per output channel'}{outliers}): weights "
               f"{summary['float_bytes'] / 2**20:.2f} MiB -> {summary['int8_bytes'] / 2**20:.2f} MiB; "
               f"wrote {out}", err=True)

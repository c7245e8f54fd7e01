"""`ringpipe quantize`'s work: a trained run's float model -> an int8 model directory.

    summary = quantize_run("out", "out-int8", granularity="channel", outlier_threshold=6.0)

Reads the run's model (RUN/ or, for a run stopped early, its newest checkpoint: RUN/checkpoint/ or
RUN/checkpoints/step-N/), quantizes each linear weight (model/quantization/int8.py), keeps
embeddings, LayerNorms and biases in float, and writes the directory `Int8GPT.from_pretrained`
reads (model/quantization/gpt2_int8.py).
"""
from __future__ import annotations

import os

from ringpipe.model.data.dataset import TokenDataset
from ringpipe.model.data.tokenizer import load_tokenizer
from ringpipe.model.families import DEFAULT_FAMILY, checkpoint_family, family
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.inference.weights import locate_weights
from ringpipe.model.quantization.gpt2_int8 import Int8GPT, linear_weight_names, save_int8_gpt
from ringpipe.model.quantization.int8_format import quantization_config
from ringpipe.model.quantization.int8 import quantize_int8
from ringpipe.model.quantization.outliers import outlier_features
from ringpipe.model.training.checkpoint_metadata import is_sharded, read_metadata
from ringpipe.model.training.sharded_checkpoint import load_consolidated

TOKEN_FILE = "tokens.bin"
INT8_FAMILIES = {"gpt2": (linear_weight_names, Int8GPT)}  # family -> (its linear weights, its int8 model)
CALIBRATION_BATCH = (8, 64)  # sequences, tokens (at most block_size) per calibration batch


def model_directory(run_dir: str) -> str:
    """The model files of a run directory: its final model, or if it stopped before it its newest
    committed checkpoint (a sharded one included), as `ringpipe generate` finds them; a model directory
    or a sharded checkpoint is its own. ValueError in one line if there are none."""
    return locate_weights(run_dir)


def load_float_model(source: str) -> tuple:
    """-> (family name, config, params as host arrays) of a model directory or a sharded checkpoint."""
    if is_sharded(source):
        config, params, _ = load_consolidated(source)
        return read_metadata(source)["config"].get("family", DEFAULT_FAMILY), config, params
    name = check_int8_family(source)
    return (name, *family(name).load_checkpoint(source))


def check_int8_family(directory: str, name: str | None = None) -> str:
    """The model family of `directory` (`name` if given) if int8 quantization knows its layers; else
    ValueError saying which family and which layers int8 covers."""
    name = name or checkpoint_family(directory) or DEFAULT_FAMILY
    if name not in INT8_FAMILIES:
        raise ValueError(f"{directory} holds a {name} model, whose layers quantize differently: int8 covers "
                         f"{', '.join(INT8_FAMILIES)} only (GPT-2's Conv1D linears attn.c_attn, attn.c_proj, "
                         f"mlp.c_fc, mlp.c_proj, one scale per output channel); {name}'s are not mapped")
    return name


def quantizable_source(run_dir: str) -> str:
    """The model directory of `run_dir` (`model_directory`) if int8 can quantize it; ValueError in one
    line if there is none, if it is already int8, or if int8 does not map its family's layers. Reads no
    weight, so `ringpipe quantize` asks it before any work (a sharded checkpoint whose record cannot be
    read is left to `quantize_run`, which says what is damaged)."""
    source = model_directory(run_dir)
    if quantization_config(source) is not None:
        raise ValueError(f"{source} is already an int8 model (ringpipe quantize); quantize the float run")
    try:
        name = read_metadata(source)["config"].get("family", DEFAULT_FAMILY) if is_sharded(source) else None
    except ValueError:
        return source
    check_int8_family(source, name)
    return source


def quantize_run(run_dir: str, out: str, granularity: str = "channel", outlier_threshold: float | None = None,
                 calibration_batches: int = 8) -> dict:
    """Writes the int8 model of `run_dir` to `out`; -> {"source", "out", "float_bytes", "int8_bytes",
    "quantized", "outlier_rows"} (bytes of every weight as stored, the quantized weights' count, the
    outlier rows kept in float over all of them).

    outlier_threshold: keep in float the input features where the run's own training tokens
    (RUN/tokens.bin, `calibration_batches` random windows) reach it, as LLM.int8() does; None: none.
    ValueError naming the directory for an int8 source or an unsupported family."""
    source = quantizable_source(run_dir)
    name, config, params = load_float_model(source)
    check_int8_family(source, name)
    linear_names, _ = INT8_FAMILIES[name]
    tokenizer = load_tokenizer(source)
    names = linear_names(config)
    outliers = {}
    if outlier_threshold is not None:
        batches = calibration_inputs(run_dir, config.block_size, calibration_batches)
        outliers = outlier_features(GPT(config, params=params), batches, names, outlier_threshold)
    quantized = {**params, **{n: quantize_int8(params[n], granularity, outliers.get(n)) for n in names}}
    save_int8_gpt(out, config, quantized, {"granularity": granularity, "outlier_threshold": outlier_threshold,
                                           "source": os.path.abspath(source)}, tokenizer)
    return {"source": source, "out": out, "float_bytes": int(sum(p.nbytes for p in params.values())),
            "int8_bytes": int(sum(p.nbytes for p in quantized.values())), "quantized": len(names),
            "outlier_rows": int(sum(len(rows) for rows in outliers.values()))}


def calibration_inputs(run_dir: str, block_size: int, count: int) -> list:
    """`count` batches of token ids (B, T) from the run's training split (RUN/tokens.bin), at random
    windows with a fixed seed; ValueError if the run has no token file."""
    path = os.path.join(run_dir, TOKEN_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"outlier calibration reads the run's training tokens, and {path} does not exist")
    dataset = TokenDataset.from_file(path)
    batch, length = CALIBRATION_BATCH[0], min(CALIBRATION_BATCH[1], block_size)
    return [dataset.get_batch("train", i, batch, length, seed=0, sampler="random")[0] for i in range(count)]


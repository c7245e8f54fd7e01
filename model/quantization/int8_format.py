"""How a model directory says its weights are ringpipe's int8: config.json's quantization_config
(Hugging Face's key) with quant_method QUANT_METHOD. Imports nothing of the model, so a reader that
must refuse such a directory (a resumed run) can ask cheaply."""
from __future__ import annotations

import json
import os

CONFIG_FILE = "config.json"
QUANTIZATION_KEY = "quantization_config"
QUANT_METHOD = "ringpipe_int8"


def quantization_config(directory) -> dict | None:
    """config.json's quantization_config of a model directory if it names ringpipe's int8, else None
    (a float model, another method, or no readable config: the float reader says what is wrong)."""
    try:
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            quantization = json.load(f).get(QUANTIZATION_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return quantization if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD \
        else None

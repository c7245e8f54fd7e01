"""Quantized weights for inference: int8 with absmax scales (int8.py), GPT-2's int8 model and its
files (gpt2_int8.py), LLM.int8()-style outlier features found on calibration text (outliers.py), and
the quantization of a trained run (quantize.py)."""

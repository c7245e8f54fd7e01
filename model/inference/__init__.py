"""Inference: text generation with a KV cache, in one process or across workers under a layout."""

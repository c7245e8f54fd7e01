"""T5: the encoder-decoder family (config, model, HF-format I/O, generation, parallel plan)."""

"""GPT-2: its config and parameters (config.py), the model (model.py) built from the block
(block.py), sampling (generation.py) and Hugging Face-format checkpoints (checkpoint.py, hf_config.py).
"""

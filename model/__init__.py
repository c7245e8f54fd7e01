"""The dense GPT-2 as forward/backward op pairs, its optimizer, data and checkpoints."""
from model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]

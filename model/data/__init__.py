"""Text to training batches: tokenizers (tokenizer.py) and corpora, token files and samplers
(dataset.py).
"""

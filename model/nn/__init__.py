"""Op forward/backward pairs (ops.py) with their fused C kernels (kernels.py, csrc/), AdamW
(optim.py), mixed precision and activation-memory accounting: what every model family builds on.
"""

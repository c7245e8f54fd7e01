"""BERT: a bidirectional encoder trained as a masked language model (see model/families.py)."""

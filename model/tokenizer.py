"""Tokenizers: characters of a corpus, or raw UTF-8 bytes; saved as one small `tokenizer.json`.

The JSON format is ours: {"type": "char", "chars": "..."} or {"type": "byte"}.
"""
from __future__ import annotations

import json
import os

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """What every tokenizer shares: `save(dir)` writes its `to_json()` as `dir/tokenizer.json`."""

    def to_json(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)


class CharTokenizer(Tokenizer):
    """One token per distinct character of the corpus; ids follow sorted character order."""

    type = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("char tokenizer needs at least one character in its vocabulary")
        self.chars = "".join(sorted(set(chars)))
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """str of length N -> (N,) int64 ids; names the first character outside the vocabulary."""
        # Vectorised lookup: characters as code points, found by binary search in the sorted vocab.
        codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self.codepoints, codepoints)
        known = self.codepoints[np.minimum(ids, self.vocab_size - 1)] == codepoints
        if not known.all():
            position = int(np.argmin(known))
            raise ValueError(
                f"character {text[position]!r} at position {position} is not in the char "
                f"tokenizer's vocabulary of {self.vocab_size} characters")
        return ids.astype(np.int64)

    def decode(self, ids) -> str:
        """ids (any int sequence/array) -> str."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) for char tokenizer")
        return "".join(self.chars[i] for i in ids.tolist())

    def to_json(self) -> dict:
        return {"type": self.type, "chars": self.chars}


class ByteTokenizer(Tokenizer):
    """The 256 byte values of UTF-8 text; decoding replaces invalid byte sequences."""

    type = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """str -> (number of UTF-8 bytes,) int64 ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError("token id out of range [0, 256) for byte tokenizer")
        return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": self.type}


def make_tokenizer(kind: str, text: str):
    """A tokenizer of `kind` ("char" or "byte"); a char vocabulary is the characters of `text`."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}; expected 'char' or 'byte'")


def tokenizer_from_json(spec: dict):
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "char" and isinstance(spec.get("chars"), str):
        return CharTokenizer(spec["chars"])
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unrecognised tokenizer description (type {kind!r})")


def load_tokenizer(directory: str):
    """The tokenizer saved in `directory/tokenizer.json` (ValueError naming the file if bad)."""
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        return tokenizer_from_json(spec)
    except FileNotFoundError:
        raise ValueError(f"no tokenizer file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"corrupt tokenizer file {path}: {exc}") from None

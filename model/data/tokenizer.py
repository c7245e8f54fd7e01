"""Tokenizers: characters of a corpus, or raw UTF-8 bytes; saved as Hugging Face tokenizer files.

`save(dir)` writes `tokenizer.json` built with the `tokenizers` library, plus the
`tokenizer_config.json` and `special_tokens_map.json` transformers reads, so that
`AutoTokenizer.from_pretrained(run_dir)` gives ringpipe's ids:
    char  a WordLevel model whose words are single characters (a pre-tokenizer isolates every code
          point), ids in sorted character order. No unknown token: a character outside the
          vocabulary is an error in ringpipe and in `tokenizers` alike, never a silent id.
    byte  GPT-2's byte-level alphabet (each byte shown as one printable character) under a BPE
          model with the 256 bytes and no merges, so the id of a byte is its value.
ringpipe encodes with its own vectorised code and reads the files back without `tokenizers`.
Run directories of earlier versions hold ringpipe's own `tokenizer.json`, {"type": "char",
"chars": "..."} or {"type": "byte"}; they still load. Any other Hugging Face tokenizer (a trained
BPE, a tokenizer directory) is held by `tokenizers` itself: model/data/hf_tokenizer.py.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ringpipe.model.data.hf_tokenizer import (  # noqa: F401  (the file names: importers find them here)
    SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES, TRANSFORMERS_CONFIG,
    Tokenizer, load_hf_directory, train_bpe)


def gpt2_byte_alphabet() -> list:
    """GPT-2's printable stand-in for each byte value: printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


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

    def hf_tokenizer(self):
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        # No unk_token in the vocabulary: tokenizers then refuses unknown characters, as encode does.
        tokenizer = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(self.chars)},
                                                 unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
        return tokenizer


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

    def hf_tokenizer(self):
        from tokenizers import decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {char: byte for byte, char in enumerate(gpt2_byte_alphabet())}
        tokenizer = HFTokenizer(models.BPE(vocab, []))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer


KINDS = ("char", "byte", "bpe")  # beside these, `--tokenizer` takes a Hugging Face tokenizer DIR


def encodable(tokenizer, text: str) -> bool:
    """Whether `tokenizer` can encode `text` (a char tokenizer knows only its corpus' characters)."""
    try:
        tokenizer.encode(text)
        return True
    except ValueError:
        return False


def make_tokenizer(kind: str, text: str, vocab_size: int | None = None):
    """The tokenizer `--tokenizer kind` names: "char" (the characters of `text`), "byte", "bpe"
    (a byte-level BPE of `vocab_size` tokens trained on `text`, see model/data/hf_tokenizer.py), or
    the path of a Hugging Face tokenizer directory."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer 'bpe' needs a vocabulary size (--vocab-size)")
        return train_bpe(text, vocab_size)
    if os.path.isdir(kind):
        return load_tokenizer(kind)
    raise ValueError(f"unknown tokenizer {kind!r}; expected 'char', 'byte', 'bpe' or a Hugging Face "
                     "tokenizer directory")


def tokenizer_type(kind: str) -> str | None:
    """The `type` of the tokenizer `make_tokenizer(kind, ...)` gives: "char", "byte", "hf" for
    "bpe" (held by the `tokenizers` library), None for a directory (whatever it holds)."""
    return {"char": "char", "byte": "byte", "bpe": "hf"}.get(kind)


def tokenizer_from_json(spec: dict):
    """A tokenizer from a parsed tokenizer.json: the Hugging Face files `save` writes, or ringpipe's
    earlier own format. ValueError for anything else."""
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        return _from_hf_json(spec)
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "char" and isinstance(spec.get("chars"), str):
        return CharTokenizer(spec["chars"])
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unrecognised tokenizer description (type {kind!r})")


def _from_hf_json(spec: dict):
    """The char or byte tokenizer a Hugging Face tokenizer.json describes, if it is one of them."""
    model = spec["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or spec.get("added_tokens"):
        raise ValueError("a Hugging Face tokenizer that is not ringpipe's char or byte tokenizer")
    by_id = sorted(vocab, key=vocab.get)
    if model.get("type") == "WordLevel" and by_id and all(len(c) == 1 for c in by_id):
        tokenizer = CharTokenizer("".join(by_id))
        if tokenizer.chars == "".join(by_id) and sorted(vocab.values()) == list(range(len(by_id))):
            return tokenizer
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    if (model.get("type") == "BPE" and not model.get("merges")
            and pre_tokenizer.get("type") == "ByteLevel"
            and vocab == {char: byte for byte, char in enumerate(gpt2_byte_alphabet())}):
        return ByteTokenizer()
    raise ValueError(f"a Hugging Face {model.get('type')} tokenizer that is not ringpipe's char "
                     "(single characters in sorted order) or byte tokenizer")


def load_tokenizer(directory: str):
    """The tokenizer saved in `directory/tokenizer.json` (ValueError naming the file if bad): a char
    or byte tokenizer where the file describes one (ringpipe's own code encodes), else the Hugging
    Face tokenizer it holds (model/data/hf_tokenizer.py)."""
    path = os.path.join(directory, TOKENIZER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        return tokenizer_from_json(spec)
    except FileNotFoundError:
        raise ValueError(f"no tokenizer file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt tokenizer file {path}: {exc}") from None
    except ValueError as exc:
        if not (isinstance(spec, dict) and isinstance(spec.get("model"), dict)):
            raise ValueError(f"tokenizer file {path}: {exc}") from None
    return load_hf_directory(directory)

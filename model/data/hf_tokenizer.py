"""The Hugging Face tokenizer files every tokenizer saves (`Tokenizer`), and the tokenizers held by
the `tokenizers` library: a byte-level BPE trained on the corpus (`--tokenizer bpe --vocab-size N`)
and any Hugging Face tokenizer directory (`--tokenizer DIR`). model/data/tokenizer.py holds the
char and byte tokenizers and chooses among all of them.

The last two are a `HuggingFaceTokenizer`: ids and text come from `tokenizers` itself, so they are the ids
`transformers` gives for the same files. What it saves is its `tokenizer.json` with the
`tokenizer_config.json` (and `special_tokens_map.json`) it came with, so a run directory opens in
`AutoTokenizer` as its source did. The trained BPE follows GPT-2: the 256 byte stand-ins as its
alphabet, GPT-2's pre-tokenizing regex, no prefix space, and `<|endoftext|>` (id 0) as its only
special token; its files load as `GPT2TokenizerFast`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ringpipe.runtime.files import make_directory, write_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)

# What transformers needs beside tokenizer.json: the class to build (not GPT2TokenizerFast, which
# config.json's model_type would pick), and no clean-up of spaces around punctuation in decode.
TRANSFORMERS_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast",
                       "clean_up_tokenization_spaces": False}


class Tokenizer:
    """What every tokenizer shares: `save(dir)` writes its Hugging Face tokenizer files."""

    type = ""

    def hf_tokenizer(self):
        """This tokenizer as a `tokenizers.Tokenizer` (same ids, same decoding)."""
        raise NotImplementedError

    def files(self) -> dict:
        """File name -> text of each file `save` writes."""
        return {TOKENIZER_FILE: self.hf_tokenizer().to_str(pretty=True),
                TOKENIZER_CONFIG_FILE: json.dumps(TRANSFORMERS_CONFIG, indent=2),
                SPECIAL_TOKENS_FILE: "{}"}

    def save(self, directory: str) -> None:
        """Each file written beside its target and renamed over it (runtime.files)."""
        make_directory(directory)
        for name, text in self.files().items():
            write_text(os.path.join(directory, name), text)


END_OF_TEXT = "<|endoftext|>"
BPE_MIN_VOCAB = 257  # the 256 bytes and END_OF_TEXT
BPE_MAX_VOCAB = 65536  # ids are stored as uint16 in the run's token file
BPE_CONFIG = {"tokenizer_class": "GPT2TokenizerFast", "add_prefix_space": False,
              "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
              "clean_up_tokenization_spaces": False}


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the transformers files saved beside it.

    tokenizer: the `tokenizers.Tokenizer`; config_files: file name -> text for
    tokenizer_config.json and special_tokens_map.json (written as given)."""

    type = "hf"

    def __init__(self, tokenizer, config_files: dict):
        self.tokenizer = tokenizer
        self.config_files = {SPECIAL_TOKENS_FILE: "{}", **config_files}

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added (special) tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """str -> (N,) int64 ids, no special tokens added; ValueError if the tokenizer cannot
        express the text (e.g. a word-level vocabulary without an unknown token)."""
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        except Exception as exc:  # tokenizers raises its own exception type
            raise ValueError(f"the Hugging Face tokenizer cannot encode the text: {exc}") from None
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}) for the Hugging Face "
                             "tokenizer")
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def hf_tokenizer(self):
        return self.tokenizer

    def token_id(self, token: str) -> int:
        """The id of a whole token (e.g. a special token's text); ValueError if it has none."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def files(self) -> dict:
        return {TOKENIZER_FILE: self.tokenizer.to_str(pretty=True), **self.config_files}


def check_bpe_vocab_size(vocab_size: int) -> None:
    """ValueError naming a BPE vocabulary size outside [257, 65536]."""
    if not BPE_MIN_VOCAB <= vocab_size <= BPE_MAX_VOCAB:
        raise ValueError(f"BPE vocabulary size {vocab_size} must be between {BPE_MIN_VOCAB} (the "
                         f"256 bytes and {END_OF_TEXT}) and {BPE_MAX_VOCAB}")


def train_bpe(text: str, vocab_size: int) -> HuggingFaceTokenizer:
    """A byte-level BPE of at most `vocab_size` tokens trained on `text` (fewer when the text has
    no more pairs to merge). ValueError for a size outside [257, 65536]."""
    check_bpe_vocab_size(vocab_size)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_chunks(text), trainer)
    return HuggingFaceTokenizer(tokenizer, {TOKENIZER_CONFIG_FILE: json.dumps(BPE_CONFIG, indent=2)})


def _chunks(text: str, size: int = 1 << 20):
    """The text in pieces of about `size` characters, cut after a newline, for training only: the
    pair counts it learns from change by at most the whitespace around each cut."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def load_hf_directory(directory: str) -> HuggingFaceTokenizer:
    """The tokenizer saved in a Hugging Face tokenizer directory (its tokenizer.json, as a fast
    tokenizer's `save_pretrained` writes it). ValueError naming the file when it cannot be read."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no {TOKENIZER_FILE} in {directory} (a Hugging Face tokenizer directory "
                         "saved by a fast tokenizer's save_pretrained is expected)")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises its own exception type
        raise ValueError(f"tokenizer file {path} is not a Hugging Face tokenizer: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    config_files = {}
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE):
        config_path = os.path.join(directory, name)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config_files[name] = f.read()
    config_files.setdefault(TOKENIZER_CONFIG_FILE, json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))
    return HuggingFaceTokenizer(tokenizer, config_files)


def with_special_tokens(tokenizer: Tokenizer, roles: dict, additional=()) -> HuggingFaceTokenizer:
    """`tokenizer` (any kind) with the special tokens a model family needs in its vocabulary.

    roles: transformers' name -> token text, e.g. {"mask_token": "[MASK]", "pad_token": "[PAD]",
    "sep_token": "[SEP]"}; additional: further special tokens in order (T5's sentinels). A token
    the vocabulary lacks gets the next free id, in the order given; every existing id stays. The
    tokens are matched whole in text and never split; tokenizer_config.json names their roles, so
    transformers' `mask_token_id` and the like give the same ids.
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    inner = HFTokenizer.from_str(tokenizer.hf_tokenizer().to_str())  # a copy to add to
    tokens = list(dict.fromkeys([*roles.values(), *additional]))
    inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    files = tokenizer.files()
    config = {**json.loads(files[TOKENIZER_CONFIG_FILE]), **roles}
    if additional:
        earlier = config.get("additional_special_tokens") or []
        config["additional_special_tokens"] = list(dict.fromkeys([*earlier, *additional]))
    return HuggingFaceTokenizer(inner, {TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2),
                                        SPECIAL_TOKENS_FILE: files[SPECIAL_TOKENS_FILE]})

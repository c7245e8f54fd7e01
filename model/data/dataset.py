"""Corpus loading, the uint16 token file, the train/val split and deterministic batches.

Default corpus (no data argument): the top-level `*.py` files of the running Python's standard
library, sorted by name and concatenated, capped at DEFAULT_CORPUS_CHARS characters so tokenizing
stays quick. It is deterministic for a given Python version, and needs no download.
"""
from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np

from ringpipe.runtime.files import write_bytes

DEFAULT_CORPUS_CHARS = 2_000_000
SPLITS = ("train", "val")
SAMPLERS = ("epoch", "random")  # how train batches walk the split, see TokenDataset.get_batch
TOKEN_DTYPE = np.uint16  # vocabularies up to 65536 tokens; half the disk of int32


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"data file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"cannot read data file {path}: {exc.strerror}") from None


def corpus_files(data: str | None) -> list[str]:
    """The sorted list of files named by `data`: a FILE, a DIR (all files below it, hidden ones
    excepted) or a GLOB.

    None means the default corpus (the standard library's top-level *.py files).
    """
    if data is None:
        return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if os.path.isfile(data):
        return [data]
    if os.path.isdir(data):
        files = []
        for root, dirs, names in os.walk(data):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .git and the like
            files += [os.path.join(root, name) for name in names if not name.startswith(".")]
        if not files:
            raise ValueError(f"data directory {data} holds no files")
        return sorted(files)
    files = sorted(path for path in glob.glob(data, recursive=True) if os.path.isfile(path))
    if not files:
        raise ValueError(f"no files matched data {data!r}")
    return files


def load_corpus(data: str | None = None, max_chars: int | None = None) -> str:
    """The text of the corpus named by `data` (see `corpus_files`), files concatenated in order.

    `max_chars` caps the text; it defaults to DEFAULT_CORPUS_CHARS for the default corpus only.
    """
    if data is None and max_chars is None:
        max_chars = DEFAULT_CORPUS_CHARS
    pieces, total = [], 0
    for path in corpus_files(data):
        pieces.append(_read_text(path))
        total += len(pieces[-1])
        if max_chars is not None and total >= max_chars:
            break
    text = "".join(pieces)
    if max_chars is not None:
        text = text[:max_chars]
    if not text:
        raise ValueError(f"corpus {data or 'stdlib'} is empty")
    return text


def write_token_file(ids, path: str) -> None:
    """Write ids (N,) as a raw uint16 file, atomically; FileWriteError if it cannot be written."""
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"token id {int(ids.max())} does not fit the uint16 token file {path}")
    write_bytes(path, ids.astype(TOKEN_DTYPE).tobytes())


class TokenDataset:
    """A token stream split into train (first part) and val (last part), batched deterministically.

    `tokens` is any 1-D int array, usually the memory map of a token file (`from_file`).
    """

    def __init__(self, tokens, val_fraction: float = 0.1):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val fraction must be between 0 and 1, got {val_fraction}")
        tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
        if len(tokens) == 0:
            raise ValueError("corpus is empty: no tokens")
        n_train = int(round(len(tokens) * (1.0 - val_fraction)))
        self.splits = {"train": tokens[:n_train], "val": tokens[n_train:]}
        self._epoch_cache: dict = {}

    @classmethod
    def from_file(cls, path: str, val_fraction: float = 0.1) -> "TokenDataset":
        """Memory-map the uint16 token file at `path`."""
        if os.path.getsize(path) == 0:
            raise ValueError(f"token file {path} is empty")
        return cls(np.memmap(path, dtype=TOKEN_DTYPE, mode="r"), val_fraction)

    def check_block_size(self, block_size: int) -> None:
        """ValueError unless both splits hold at least one (block_size + 1)-token window."""
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise ValueError(
                    f"corpus too small for block size {block_size}: the {split} split has "
                    f"{len(tokens)} tokens, needs at least {block_size + 1}")

    def get_batch(self, split: str, step: int, batch_size: int, block_size: int, seed: int,
                  sampler: str = "epoch"):
        """The GLOBAL batch of `step`: x, y (batch_size, block_size) int64, y = x shifted by one.

        The batch depends only on (seed, step, split), never on how many workers consume it:
        data-parallel ranks take row slices of it, and a resumed run sees the same batches.
        With sampler "epoch", train batches walk through the split in shuffled epochs
        (`train_window_starts`); with "random" they are windows at uniformly random offsets, drawn
        with replacement, as nanoGPT draws them. Val batches are always random windows: an
        unbiased sample of every window in the split.
        """
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        self.check_block_size(block_size)
        tokens = self.splits[split]
        if split == "train" and sampler == "epoch":
            starts = self.train_window_starts(step * batch_size, batch_size, block_size, seed)
        else:
            rng = np.random.default_rng([seed, step, SPLITS.index(split)])
            starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
        window = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
        return window[:, :-1], window[:, 1:]

    def train_window_starts(self, first: int, count: int, block_size: int, seed: int):
        """Start offsets of train samples first .. first+count-1 (a sample is a window of
        block_size + 1 tokens), as an int64 array.

        Samples come in epochs: each epoch tiles the split with back-to-back windows shifted by a
        random phase below block_size, and visits them in a random order; both are drawn from
        (seed, epoch). So every token (but a window's worth at the ends) is trained on once per
        epoch, as with a shuffled dataset of fixed sequences (Megatron's GPT dataset), where
        windows drawn at random offsets with replacement leave about e^-1.5 = 22 % of the tokens
        unseen after 1.5 epochs; the phase lets later epochs cut the text at other places.
        """
        max_start = len(self.splits["train"]) - block_size - 1
        per_epoch = max(1, max_start // block_size)
        # Room for the phase: one window is given up so that any shift below block_size fits.
        phases = min(block_size, max_start - (per_epoch - 1) * block_size + 1)
        epochs, positions = np.divmod(np.arange(first, first + count, dtype=np.int64), per_epoch)
        starts = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            phase, order = self._epoch_order(seed, int(epoch), per_epoch, phases)
            mine = epochs == epoch
            starts[mine] = phase + order[positions[mine]] * block_size
        return starts

    def _epoch_order(self, seed: int, epoch: int, per_epoch: int, phases: int):
        """(phase, permutation of the epoch's windows), cached: a step asks for one epoch, rarely
        two, and drawing a permutation of a large split on every step would cost more than the
        batch."""
        key = (seed, epoch, per_epoch, phases)
        if self._epoch_cache.get("key") != key:
            rng = np.random.default_rng([seed, epoch, len(SPLITS)])  # a stream of its own
            phase = int(rng.integers(0, phases))
            self._epoch_cache = {"key": key, "value": (phase, rng.permutation(per_epoch))}
        return self._epoch_cache["value"]

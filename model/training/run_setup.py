"""What a run needs besides its model: `RunSetup` (the run directory, config, tokenizer, token file, step).

    setup = RunSetup.create(config, run_dir)   # a fresh run: tokenize the corpus
    setup = RunSetup.resume(config, run_dir)   # its checkpoint's tokenizer and step, checked against the run
    setup.write_token_file()                   # RUN/tokens.bin, once everything else is checked
    setup.tokenizer, setup.vocab_size, setup.special_ids, setup.step, setup.token_file, setup.model_config

`Trainer.create/resume` build the model and AdamW on top of it; the driver of a multi-worker run
(cluster/distributed_train.py) uses it alone, so it never holds a weight: the workers make their own
shards. A config that cannot work, a checkpoint of another family, tokenizer or model shape is a
ValueError before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from ringpipe.model.data.dataset import TOKEN_DTYPE, TokenDataset, load_corpus, write_token_file
from ringpipe.model.data.hf_tokenizer import with_special_tokens
from ringpipe.model.data.tokenizer import load_tokenizer, make_tokenizer, tokenizer_type
from ringpipe.model.families import check_checkpoint_family, family, special_ids
from ringpipe.model.nn.mixed_precision import weights_dtype
from ringpipe.model.training.checkpoint_metadata import remove_unfinished
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import TOKEN_FILE, find_checkpoint, read_trainer_state
from ringpipe.model.training.sharded_checkpoint import check_resumable
from ringpipe.runtime.files import make_directory, remove_dead_temporaries


def tokenize_corpus(config: TrainConfig, tokenizer=None):
    """(tokenizer, ids) for the corpus; a given tokenizer (from a checkpoint) must cover it. A new
    tokenizer gets the special tokens the model family needs (BERT's mask, ...)."""
    text = load_corpus(config.data)
    if tokenizer is None:
        tokenizer = make_tokenizer(config.tokenizer, text, config.bpe_vocab_size)
        model_family = family(config.family)
        if model_family.special_tokens or model_family.additional_tokens:
            tokenizer = with_special_tokens(tokenizer, model_family.special_tokens,
                                            model_family.additional_tokens)
        ids = tokenizer.encode(text)
    else:
        try:
            ids = tokenizer.encode(text)
        except ValueError as exc:
            raise ValueError(f"the data does not fit the checkpoint's tokenizer: {exc}") from None
    TokenDataset(ids, config.val_fraction).check_block_size(config.model.block_size)
    return tokenizer, ids


def check_same_corpus(ids, run_dir: str, data: str | None) -> None:
    """ValueError when the run's token file holds other tokens than `ids`: its --data names another
    corpus, or the corpus was edited. Resuming would train on other text than the run's (and overwrite
    the token file); the same text anywhere else (a moved or copied file) resumes."""
    path = os.path.join(run_dir, TOKEN_FILE)
    if not os.path.exists(path):  # a run from before token files were kept in it
        return
    saved = np.fromfile(path, dtype=TOKEN_DTYPE)
    if saved.shape != (len(ids),) or not np.array_equal(saved, np.asarray(ids)):
        raise ValueError(f"--data {data or '(the Python standard library)'} holds other text than the corpus the "
                         f"run in {run_dir} trained on ({len(ids)} tokens vs {saved.size} in its {TOKEN_FILE}); "
                         "resume with that corpus, or start a new run")


@dataclass
class RunSetup:
    config: TrainConfig
    run_dir: str
    tokenizer: object  # None for a run on a token file written some other way (`ringpipe bench memory`)
    vocab_size: int
    step: int = 0  # steps completed = the next step to run
    special_ids: dict = field(default_factory=dict)  # {role: id} of the family's special tokens
    ids: object = None  # the corpus's token ids, until `write_token_file`

    @property
    def token_file(self) -> str:
        return os.path.abspath(os.path.join(self.run_dir, TOKEN_FILE))

    @property
    def model_config(self):
        """The model the run trains, with the dtype its weights are saved in (float32 master
        weights for a mixed run)."""
        return dataclasses.replace(self.config.model_config(self.vocab_size), dtype=weights_dtype(self.config.dtype))

    def write_token_file(self) -> TokenDataset:
        """RUN/tokens.bin from the corpus's ids; the dataset reading it."""
        make_directory(self.run_dir)
        write_token_file(self.ids, self.token_file)
        return TokenDataset.from_file(self.token_file, self.config.val_fraction)

    @classmethod
    def create(cls, config: TrainConfig, run_dir: str) -> "RunSetup":
        config.validate()
        remove_dead_temporaries(run_dir)
        remove_unfinished(run_dir)  # a multi-worker save cut short
        tokenizer, ids = tokenize_corpus(config)
        config.model_config(tokenizer.vocab_size)  # a model that cannot be built is refused here
        return cls(config, run_dir, tokenizer, tokenizer.vocab_size,
                   special_ids=special_ids(tokenizer, family(config.family)), ids=ids)

    @classmethod
    def resume(cls, config: TrainConfig, run_dir: str) -> "RunSetup":
        """The run in `run_dir/checkpoint`, continued under `config` (usually the saved one); a
        sharded checkpoint's pieces are checked here (sizes, coverage, the model), a consolidated
        one's weights as they are read."""
        config.validate()
        remove_dead_temporaries(run_dir)
        remove_unfinished(run_dir)  # a multi-worker save cut short
        checkpoint = find_checkpoint(run_dir)
        model_family = family(config.family)
        check_checkpoint_family(checkpoint, model_family.name)
        state = read_trainer_state(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
        # (A family with special tokens saves them in a Hugging Face tokenizer, whatever it was made from.)
        if not model_family.special_tokens and tokenizer_type(config.tokenizer) not in (None, tokenizer.type):
            raise ValueError(f"tokenizer {config.tokenizer!r} differs from the checkpoint's "
                             f"{tokenizer.type!r} in {checkpoint}")
        _, ids = tokenize_corpus(config, tokenizer)
        check_same_corpus(ids, run_dir, config.data)
        check_resumable(checkpoint, config.model_config(tokenizer.vocab_size), model_family)  # before reading it
        return cls(config, run_dir, tokenizer, tokenizer.vocab_size, step=state["step"],
                   special_ids=special_ids(tokenizer, model_family), ids=ids)

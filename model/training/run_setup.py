"""What the driver of a parallel run needs to start it, and no model: `RunSetup`.

    setup = RunSetup.create(config, run_dir)   # a fresh run: tokenize, write RUN/tokens.bin
    setup = RunSetup.resume(config, run_dir)   # its checkpoint's tokenizer, step and model shape
    setup.tokenizer, setup.token_file, setup.vocab_size, setup.step, setup.model_config

`Trainer.create/resume` do the same and also build the GPT and AdamW; the driver of a multi-worker
run (cluster/distributed_train.py) uses this instead, so it never holds a weight: the workers build
their own shards. Checks are the Trainer's: a config that cannot work, a tokenizer or a model shape
that differs from the checkpoint's is a ValueError before anything is written.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ringpipe.model.data.tokenizer import load_tokenizer, tokenizer_type
from ringpipe.model.gpt2.checkpoint import load_config
from ringpipe.model.gpt2.config import ARCHITECTURE_FIELDS, GPTConfig
from ringpipe.model.nn.mixed_precision import weights_dtype
from ringpipe.model.training.config import TrainConfig
from ringpipe.model.training.run_dir import TOKEN_FILE, find_checkpoint, read_trainer_state
from ringpipe.model.training.trainer import _token_dataset, _tokenize_corpus
from ringpipe.runtime.files import remove_dead_temporaries


@dataclass
class RunSetup:
    config: TrainConfig
    run_dir: str
    tokenizer: object  # None for a run on a token file written some other way (`ringpipe bench memory`)
    vocab_size: int
    step: int = 0  # steps completed = the next step to run

    @property
    def token_file(self) -> str:
        return os.path.abspath(os.path.join(self.run_dir, TOKEN_FILE))

    @property
    def model_config(self) -> GPTConfig:
        """The model the run trains, with the dtype its weights are saved in (float32 master
        weights for a mixed run)."""
        return dataclasses.replace(self.config.gpt_config(self.vocab_size), dtype=weights_dtype(self.config.dtype))

    @classmethod
    def create(cls, config: TrainConfig, run_dir: str) -> "RunSetup":
        config.validate()
        remove_dead_temporaries(run_dir)
        tokenizer, ids = _tokenize_corpus(config)
        config.gpt_config(tokenizer.vocab_size)  # a model that cannot be built is refused before writing
        _token_dataset(config, ids, run_dir)
        return cls(config, run_dir, tokenizer, tokenizer.vocab_size)

    @classmethod
    def resume(cls, config: TrainConfig, run_dir: str) -> "RunSetup":
        config.validate()
        remove_dead_temporaries(run_dir)
        checkpoint = find_checkpoint(run_dir)
        state = read_trainer_state(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
        if tokenizer_type(config.tokenizer) not in (None, tokenizer.type):
            raise ValueError(f"tokenizer {config.tokenizer!r} differs from the checkpoint's "
                             f"{tokenizer.type!r} in {checkpoint}")
        _, ids = _tokenize_corpus(config, tokenizer)
        try:
            saved = load_config(checkpoint)
        except Exception as exc:  # any reader error means the same thing to the user
            raise ValueError(f"corrupt checkpoint {checkpoint}: {exc}") from None
        expected = config.gpt_config(tokenizer.vocab_size)
        for name in ARCHITECTURE_FIELDS:
            if getattr(saved, name) != getattr(expected, name):
                raise ValueError(f"checkpoint {checkpoint} has {name} {getattr(saved, name)}, the run expects "
                                 f"{getattr(expected, name)}")
        _token_dataset(config, ids, run_dir)
        return cls(config, run_dir, tokenizer, tokenizer.vocab_size, step=state["step"])

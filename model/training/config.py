"""`TrainConfig`: everything that defines a training run, saved in each checkpoint."""
from __future__ import annotations

import dataclasses
import math

from ringpipe.model.data.dataset import SAMPLERS
from ringpipe.model.data.hf_tokenizer import check_bpe_vocab_size
from ringpipe.model.families import DEFAULT_FAMILY, family
from ringpipe.model.gpt2.config import GPTOptions
from ringpipe.model.gpt2.family import small_gpt  # noqa: F401  (the default model; importers find it here)
from ringpipe.model.nn.mixed_precision import check_supported, model_dtype

ON_NONFINITE = ("stop", "skip")  # what a step with a non-finite loss or gradient norm does
# GPT-2's options a run chooses (the `--n-layer`... flags): the fields of `TrainConfig.model` when
# the family is gpt2 (each family's are the fields of its `options`, see model/families.py).
# The model's other fields come from elsewhere: vocab_size from the tokenizer, dtype from the run's
# precision (`TrainConfig.dtype` names the recipe, e.g. "fp16-mixed", not an array dtype), device
# from the run's (its optimizer and data live there too).
MODEL_OPTIONS = tuple(field.name for field in dataclasses.fields(GPTOptions))


def model_options(family_name: str) -> tuple:
    """The option names (fields of `TrainConfig.model`) of a family's runs."""
    return tuple(field.name for field in dataclasses.fields(family(family_name).options))


@dataclasses.dataclass(init=False)
class TrainConfig:
    """Everything that defines a run; saved in each checkpoint. `batch_size` is the global batch
    in sequences, split into `microbatches` equal parts for gradient accumulation.

    `family` is the model family (`--model`, model/families.py) and `model` holds its options
    (GPT-2's `GPTOptions` by default). The constructor also takes them flat, as the flags and the
    trainer.json of earlier versions name them: TrainConfig(n_layer=2) is
    TrainConfig(model=replace(small_gpt(), n_layer=2)); a flat option overrides `model`'s. `model`
    may be a dict (as `dataclasses.asdict` and trainer.json hold it); options it lacks are the
    family's `default_options()`. An unknown setting is a TypeError naming it, an unknown family
    or options of another family a ValueError."""
    data: str | None = None  # FILE, DIR or GLOB; None = the standard-library corpus
    tokenizer: str = "char"  # "char", "byte", "bpe" or a Hugging Face tokenizer directory
    bpe_vocab_size: int | None = None  # `--vocab-size`: the size a "bpe" tokenizer is trained to
    # (the model's vocab_size comes from the tokenizer: a small corpus can leave a BPE smaller)
    family: str = DEFAULT_FAMILY  # `--model`: gpt2, bert, ... (model/families.py)
    model: GPTOptions = dataclasses.field(default_factory=small_gpt)
    batch_size: int = 12
    microbatches: int = 1
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"  # or "fp16-mixed" (see model/nn/mixed_precision.py)
    loss_scale_growth_interval: int = 2000  # mixed precision: good steps before the scale doubles
    seed: int = 0
    val_fraction: float = 0.1
    sampler: str = "epoch"  # train batches: "epoch" (shuffled epochs) or "random" (random offsets)
    eval_every: int = 250
    eval_iters: int = 50  # val batches per evaluation; 20 left a noise of ~0.01 in the loss
    checkpoint_every: int = 500
    device: str = "cpu"
    on_nonfinite: str = "stop"  # a non-finite loss or gradient norm: "stop" the run, or "skip" the step

    def __init__(self, model=None, **settings):
        self.family = settings.pop("family", DEFAULT_FAMILY)
        model_family = family(self.family)
        options = {name: settings.pop(name) for name in model_options(self.family) if name in settings}
        if model is None or isinstance(model, dict):
            model = dataclasses.replace(model_family.default_options(), **(model or {}))
        elif not isinstance(model, model_family.options):
            raise ValueError(f"TrainConfig: model options {type(model).__name__} are not those of "
                             f"the {self.family} family ({model_family.options.__name__})")
        self.model = dataclasses.replace(model, **options)
        for field in dataclasses.fields(self):
            if field.name not in ("model", "family"):
                setattr(self, field.name, settings.pop(field.name, field.default))
        if settings:
            raise TypeError(f"TrainConfig got an unexpected setting {next(iter(settings))!r}")

    def flat(self) -> dict:
        """Every setting by its flag's name: the model's options beside the run's."""
        settings = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**dataclasses.asdict(settings.pop("model")), **settings}

    def validate(self) -> None:
        """ValueError naming the first setting that cannot work."""
        settings = self.flat()
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "microbatches",
                     "steps", "eval_iters", "loss_scale_growth_interval"):
            if name in settings and settings[name] < 1:  # a family may name its sizes otherwise
                raise ValueError(f"{name} must be at least 1, got {settings[name]}")
        if self.batch_size % self.microbatches:
            raise ValueError(f"batch size {self.batch_size} is not divisible by "
                             f"microbatches {self.microbatches}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(SAMPLERS)}")
        if self.warmup < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("warmup, eval_every and checkpoint_every must not be negative")
        check_supported(self.dtype)
        for name, value in settings.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if (self.tokenizer == "bpe") != (self.bpe_vocab_size is not None):
            raise ValueError("tokenizer 'bpe' needs a vocabulary size (--vocab-size)"
                             if self.tokenizer == "bpe" else
                             f"a BPE vocabulary size (--vocab-size {self.bpe_vocab_size}) applies "
                             f"to tokenizer 'bpe' only, not {self.tokenizer!r}")
        if self.bpe_vocab_size is not None:
            check_bpe_vocab_size(self.bpe_vocab_size)
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, "
                             f"got {self.on_nonfinite!r}")
        # The model's own rules (n_embd divisible by n_head, ...), before any data is read: any
        # vocabulary will do here, the tokenizer's is only known then.
        family(self.family).config(**dataclasses.asdict(self.model), vocab_size=1 << 16,
                                   dtype=model_dtype(self.dtype), device="cpu")

    def model_config(self, vocab_size: int):
        """The model this run trains (its family's config): `model`'s options, `vocab_size` from
        the tokenizer, the array dtype of the run's precision and the run's device."""
        return family(self.family).config(**dataclasses.asdict(self.model), vocab_size=vocab_size,
                                          dtype=model_dtype(self.dtype), device=self.device)

    gpt_config = model_config  # its name from when GPT-2 was the only family

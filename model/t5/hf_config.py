"""Reading transformers' T5 `config.json` into a T5Config: every key it may hold, classified.

A key of transformers' T5Config (and of its PretrainedConfig base) is one of
    MODEL_KEYS      a T5Config field of the same name, so the model computes what
                    T5ForConditionalGeneration does (ALIASES: T5Config's other names for some);
    DERIVED_KEYS    what transformers derives from feed_forward_proj and tie_word_embeddings; a
                    file whose value disagrees with that derivation is refused by name;
    REFUSED_KEYS    supported only at the values given here, any other value refused by name;
    NO_EFFECT_KEYS  no part of T5ForConditionalGeneration's logits (run-time switches, dropout,
                    initialisation, other heads, metadata).
tests/test_t5_hf.py walks the installed transformers' T5Config and fails on any attribute missing
here. Keys no T5Config has (hub files carry e.g. `task_specific_params`) are ignored.
"""
from __future__ import annotations

from ringpipe.model.t5.config import T5Config

MODEL_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
              "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
              "layer_norm_epsilon", "dropout_rate", "feed_forward_proj", "scale_decoder_outputs", "pad_token_id",
              "decoder_start_token_id", "eos_token_id")

ALIASES = {"hidden_size": "d_model", "num_attention_heads": "num_heads",
           "num_hidden_layers": "num_layers", "head_dim": "d_kv"}

# transformers sets these from feed_forward_proj ("gated-gelu" -> gelu_new, gated); a file saying
# otherwise describes a model transformers itself would not build from it.
DERIVED_KEYS = ("dense_act_fn", "is_gated_act", "tie_word_embeddings")
_ACTIVATIONS = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True)}

REFUSED_KEYS = {
    "model_type": (("t5",), "this is ringpipe's T5 reader"),
    "is_encoder_decoder": ((True,), "ringpipe's T5 is the encoder-decoder"),
    "is_decoder": ((False,), "a T5ForConditionalGeneration is not a lone decoder"),
    "add_cross_attention": ((False,), "T5's decoder has its own cross-attention"),
    "pruned_heads": (({}, None), "ringpipe's attention keeps every head"),
}

NO_EFFECT_KEYS = frozenset({
    "classifier_dropout",  # T5ForSequenceClassification's head; not in T5ForConditionalGeneration
    "initializer_factor",  # initialisation only; a checkpoint brings its weights
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "chunk_size_feed_forward",  # T5's feed-forward runs unchunked whatever it says
    "bos_token_id",  # T5 has none; generation starts from decoder_start_token_id
    "id2label", "label2id", "problem_type",  # classification heads' labels
    "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
})


def _refuse_unsupported(hf: dict, path: str) -> None:
    for alias, key in ALIASES.items():
        if alias in hf and key in hf and hf[alias] != hf[key]:
            raise ValueError(f"{path}: {alias}={hf[alias]!r} contradicts {key}={hf[key]!r}")
    for key, (accepted, why) in REFUSED_KEYS.items():
        if key in hf and hf[key] not in accepted:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported ({why}; accepted: "
                             f"{', '.join(repr(v) for v in accepted)})")
    projection = hf.get("feed_forward_proj", "relu")
    if projection not in _ACTIVATIONS:
        raise ValueError(f"{path}: feed_forward_proj={projection!r} is not supported (accepted: "
                         f"{', '.join(repr(v) for v in _ACTIVATIONS)})")
    for key, value in zip(("dense_act_fn", "is_gated_act"), _ACTIVATIONS[projection]):
        if key in hf and hf[key] != value:
            raise ValueError(f"{path}: {key}={hf[key]!r} contradicts feed_forward_proj="
                             f"{projection!r} (which means {key}={value!r})")


def t5_config_from_hf(hf: dict, path: str, **ringpipe_fields) -> T5Config:
    """config.json's dict -> T5Config; ValueError naming `path` and the key for any value ringpipe
    would not compute as transformers does. `ringpipe_fields`: dtype, device."""
    _refuse_unsupported(hf, path)
    hf = {**{key: hf[alias] for alias, key in ALIASES.items() if alias in hf}, **hf}
    fields = {key: hf[key] for key in MODEL_KEYS if key in hf}
    if "scale_decoder_outputs" not in hf:  # transformers 4's files: scaled unless untied
        fields["scale_decoder_outputs"] = hf.get("tie_word_embeddings", True) is not False
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0] if fields["eos_token_id"] else None
    for key in ("pad_token_id", "decoder_start_token_id"):
        if fields.get(key) is None:
            fields.pop(key, None)
    ours = hf.get("ringpipe")
    if isinstance(ours, dict) and "block_size" in ours:  # the run's window: no key of transformers' holds it
        fields["block_size"] = ours["block_size"]
    missing = [key for key in ("vocab_size", "d_model", "num_layers", "num_heads") if key not in hf]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    try:
        return T5Config(**{**fields, **ringpipe_fields})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def hf_config(config: T5Config) -> dict:
    """The config.json transformers' T5Config reads, plus ringpipe's own config."""
    activation, gated = _ACTIVATIONS[config.feed_forward_proj]
    return {
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
        **{key: getattr(config, key) for key in MODEL_KEYS},
        "dense_act_fn": activation, "is_gated_act": gated,
        "initializer_factor": 1.0, "is_encoder_decoder": True,
        "is_decoder": False, "use_cache": True, "tie_word_embeddings": True,
        "dtype": config.dtype, "ringpipe": config.to_dict(),
    }

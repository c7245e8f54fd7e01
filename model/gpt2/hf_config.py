"""Reading transformers' GPT-2 `config.json` into a GPTConfig: every key it may hold, classified.

A key of transformers' GPT2Config (and of its PretrainedConfig base) is one of
    MODEL_KEYS      mapped onto a GPTConfig field, so the model computes what GPT2LMHeadModel does
                    (ALIASES: the other names GPT2Config accepts for some of them);
    REFUSED_KEYS    supported only at the value given here; any other value is refused by name,
                    since loading it would compute something else without a word;
    NO_EFFECT_KEYS  no part of GPT2LMHeadModel's logits or gradients (run-time switches, token ids,
                    the heads of other model classes, metadata).
tests/test_transformers_config.py walks the installed transformers' GPT2Config and fails on any
attribute missing here, so a new option cannot slip through unclassified. Keys that no GPT2Config
has (hub files carry e.g. `task_specific_params`) are ignored.
"""
from __future__ import annotations

from ringpipe.model.gpt2.config import GPTConfig

# GPT2Config key -> GPTConfig field.
MODEL_KEYS = {
    "n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "n_positions": "block_size",
    "vocab_size": "vocab_size", "n_inner": "n_inner", "layer_norm_epsilon": "layer_norm_epsilon",
    "scale_attn_weights": "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
    # Dropout rates: ringpipe has one for all three sites (checked equal in gpt_config_from_hf).
    "resid_pdrop": "dropout", "embd_pdrop": "dropout", "attn_pdrop": "dropout",
}

# GPT2Config's other names for keys above (its attribute_map); a file may use either.
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
           "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

# Activations that are GPT-2's tanh-approximated GELU, the one model/nn/ops.py implements.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh")

# Keys that change the math in ways ringpipe does not implement -> (the values it accepts, why).
REFUSED_KEYS = {
    "activation_function": (TANH_GELU, "ringpipe's MLP is GPT-2's tanh GELU"),
    "tie_word_embeddings": ((True,), "ringpipe's LM head is tied to wte"),
    "add_cross_attention": ((False,), "ringpipe's GPT-2 has no cross-attention"),
    "model_type": (("gpt2",), "ringpipe reads GPT-2 checkpoints only"),
    # Written by transformers 4.x (no longer a GPT2Config attribute in 5.x).
    "pruned_heads": (({}, None), "ringpipe's blocks keep every attention head"),
}

NO_EFFECT_KEYS = frozenset({
    # Scores computed in float32 with the scale folded into q.k: what ringpipe's float32 computes
    # (transformers runs it in float32 models only).
    "reorder_and_upcast_attn",
    "initializer_range",  # initialisation only; a checkpoint brings its weights
    "n_ctx",  # older files' copy of n_positions, which is the one read
    # GPT2DoubleHeadsModel's multiple-choice head; not in a GPT2LMHeadModel.
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "summary_last_dropout",
    # Token ids for generation and padding: the logits of given ids do not depend on them.
    "bos_token_id", "eos_token_id", "pad_token_id",
    # What a forward call returns or keeps, not what it computes.
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "chunk_size_feed_forward",  # GPT-2's MLP runs unchunked whatever it says
    "is_encoder_decoder",  # GPT2LMHeadModel is a decoder whatever it says
    # Sequence-classification heads' labels; not in a GPT2LMHeadModel.
    "id2label", "label2id", "problem_type",
    # Metadata. The weights' own dtype is read from model.safetensors.
    "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
})


def refuse_unsupported(hf: dict, path: str) -> None:
    """ValueError naming `path` and the key if config.json asks for what ringpipe does not compute;
    called before the weights are read, so the config's reason is the one reported."""
    if hf.get("quantization_config") is not None:  # Hugging Face's key for quantized weights
        quantization = hf["quantization_config"]
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise ValueError(f"{path}: a quantized model ({method}), not float weights; only `ringpipe generate` "
                         "reads ringpipe's int8 models — training and export need the float run it came from")
    for alias, key in ALIASES.items():
        if alias in hf and key in hf and hf[alias] != hf[key]:
            raise ValueError(f"{path}: {alias}={hf[alias]!r} contradicts {key}={hf[key]!r}")
    for key, (accepted, why) in REFUSED_KEYS.items():
        if key in hf and hf[key] not in accepted:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported ({why}; "
                             f"accepted: {', '.join(repr(v) for v in accepted)})")
    rates = {key: hf[key] for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop") if key in hf}
    if len(set(rates.values())) > 1:
        listed = ", ".join(f"{key}={rate}" for key, rate in rates.items())
        raise ValueError(f"{path}: dropout rates differ ({listed}); ringpipe uses one rate for "
                         "all three")


def gpt_config_from_hf(hf: dict, path: str, **ringpipe_fields):
    """config.json's dict -> GPTConfig; ValueError naming `path` and the key for any value that
    ringpipe would not compute as transformers does, or a missing shape key.

    `ringpipe_fields` are GPTConfig fields no GPT2Config key holds (dtype, device, recompute)."""
    refuse_unsupported(hf, path)
    hf = {**{key: hf[alias] for alias, key in ALIASES.items() if alias in hf}, **hf}
    rates = {key: hf[key] for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop") if key in hf}
    fields = {}
    for key, field in MODEL_KEYS.items():
        if key in hf and field != "dropout":
            fields[field] = hf[key]
    missing = [key for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
               if key not in hf]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    fields["dropout"] = float(next(iter(rates.values()), 0.0))
    try:
        return GPTConfig(**{**fields, **ringpipe_fields})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None

"""transformers' BertConfig keys <-> BertConfig: every key it may hold, classified.

A key of transformers' BertConfig (and of its PretrainedConfig base) is one of
    MODEL_KEYS      mapped onto a BertConfig field, so the model computes what BertForMaskedLM does;
    REFUSED_KEYS    supported only at the values given here; any other value is refused by name;
    NO_EFFECT_KEYS  no part of BertForMaskedLM's logits or gradients.
tests/test_bert.py walks the installed transformers' BertConfig and fails on any attribute missing
here. Keys no BertConfig has are ignored.
"""
from __future__ import annotations

from ringpipe.model.bert.config import BertConfig

# BertConfig key -> ringpipe field.
MODEL_KEYS = {
    "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "hidden_size": "n_embd",
    "max_position_embeddings": "block_size", "vocab_size": "vocab_size", "intermediate_size": "n_inner",
    "layer_norm_eps": "layer_norm_epsilon", "type_vocab_size": "type_vocab_size",
    # ringpipe has one rate for both (checked equal in bert_config_from_hf).
    "hidden_dropout_prob": "dropout", "attention_probs_dropout_prob": "dropout",
}
REFUSED_KEYS = {
    "hidden_act": (("gelu",), "ringpipe's BERT MLP is the erf GELU"),
    "tie_word_embeddings": ((True,), "ringpipe's MLM decoder is tied to the word embeddings"),
    "is_decoder": ((False,), "ringpipe's BERT is a bidirectional encoder"),
    "add_cross_attention": ((False,), "ringpipe's BERT has no cross-attention"),
    "model_type": (("bert",), "this is the BERT family's reader"),
    # Written by transformers 4.x (fixed to absolute positions since).
    "position_embedding_type": (("absolute",), "ringpipe's BERT has absolute position embeddings"),
}
NO_EFFECT_KEYS = frozenset({
    "initializer_range",  # initialisation only; a checkpoint brings its weights
    # Ids for padding and generation: the logits of given ids do not depend on them (the padding
    # row's only role in transformers is a zero gradient in training).
    "pad_token_id", "bos_token_id", "eos_token_id",
    "classifier_dropout",  # the sequence-classification head's; not in BertForMaskedLM
    "chunk_size_feed_forward",  # the MLP computed in chunks gives the same values
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "id2label", "label2id", "problem_type",
    "architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
})


def refuse_unsupported(hf: dict, path: str) -> None:
    """ValueError naming `path` and the key if config.json asks for what ringpipe does not compute."""
    for key, (accepted, why) in REFUSED_KEYS.items():
        if key in hf and hf[key] not in accepted:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported ({why}; "
                             f"accepted: {', '.join(repr(v) for v in accepted)})")
    rates = {key: hf[key] for key in ("hidden_dropout_prob", "attention_probs_dropout_prob") if key in hf}
    if len(set(rates.values())) > 1:
        listed = ", ".join(f"{key}={rate}" for key, rate in rates.items())
        raise ValueError(f"{path}: dropout rates differ ({listed}); ringpipe's BERT uses one rate for both")


def bert_config_from_hf(hf: dict, path: str, **ringpipe_fields) -> BertConfig:
    """config.json's dict -> BertConfig; ValueError naming `path` and the key for a refused value
    or a missing shape key. `ringpipe_fields`: dtype, device, next_sentence (whether the weights
    have the next-sentence head)."""
    refuse_unsupported(hf, path)
    missing = [key for key in ("num_hidden_layers", "num_attention_heads", "hidden_size",
                               "max_position_embeddings", "vocab_size") if key not in hf]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    fields = {field: hf[key] for key, field in MODEL_KEYS.items() if key in hf and field != "dropout"}
    fields["dropout"] = float(hf.get("hidden_dropout_prob", 0.0))
    if fields.get("n_inner") == 4 * fields["n_embd"]:
        fields["n_inner"] = None  # BERT's usual width, as ringpipe's options say it
    try:
        return BertConfig(**{**fields, **ringpipe_fields})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def hf_config(config: BertConfig) -> dict:
    """The config.json transformers' BertConfig reads, plus ringpipe's own config."""
    return {
        "model_type": "bert", "architectures": ["BertForPreTraining" if config.next_sentence else "BertForMaskedLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "intermediate_size": config.mlp_width, "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.block_size, "type_vocab_size": config.type_vocab_size,
        "initializer_range": 0.02, "layer_norm_eps": config.layer_norm_epsilon,
        "pad_token_id": 0, "tie_word_embeddings": True, "is_decoder": False, "add_cross_attention": False,
        "dtype": config.dtype, "ringpipe": config.to_dict(),
    }

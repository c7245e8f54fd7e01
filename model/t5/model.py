"""T5 (encoder-decoder, relative position bias, shared embeddings) with a hand-written backward.

The layers are model/t5/layers.py's op pairs; this file strings them into the whole model:

    encoder:  shared[input_ids] → layers (bidirectional self-attention, FF) → final norm
    decoder:  shared[decoder_input_ids] → layers (causal self-attention, cross-attention over
              the encoder output, FF) → final norm → × d_model^-0.5 (scale_decoder_outputs)
    dropout:  where transformers' T5 drops (config.dropout_rate; model/t5/layers.py)
              → logits against the shared embedding → cross-entropy (labels -100 skipped)

Backward runs the decoder first; the encoder output's gradient is the sum of every decoder
layer's cross-attention share, and the shared embedding's gradient the sum of the LM head's and
both embeddings'. Generation with KV caches is model/t5/generation.py; checkpoints in transformers'
format model/t5/checkpoint.py.
"""
from __future__ import annotations

import numpy as np

from ringpipe.model.gpt2.block import IdentityRegion
from ringpipe.model.nn import ops
from ringpipe.model.nn.activation_memory import ActivationMemory
from ringpipe.model.t5 import generation
from ringpipe.model.t5.checkpoint import load_checkpoint, save_checkpoint
from ringpipe.model.t5.config import T5Config, init_params
from ringpipe.model.t5.layers import T5Layers
from ringpipe.runtime.array_module import array_module, module_of, to_host


def shift_right(labels, start_token_id: int, pad_token_id: int):
    """Teacher forcing: the decoder reads the labels shifted one step right, starting with
    `start_token_id`; ignored labels (-100) read as padding. labels int (B, T) -> (B, T)."""
    shifted = module_of(labels).empty_like(labels)
    shifted[:, 0] = start_token_id
    shifted[:, 1:] = labels[:, :-1]
    shifted[shifted == -100] = pad_token_id
    return shifted


class T5(T5Layers):
    """The dense T5. `params` is a flat dict with ringpipe's T5 names (see `param_shapes`)."""

    is_encoder_decoder = True  # `ringpipe generate` gives the prompt to the encoder

    def __init__(self, config: T5Config, seed: int = 0, params: dict | None = None,
                 threads: int = 1):
        """`threads`: the trainers' argument; T5 runs a batch on one thread (GPT-2 shards it)."""
        self.config = config
        self.xp = array_module(config.device)
        self.dtype = np.dtype(config.dtype)
        source = init_params(config, seed) if params is None else params
        self.params = {name: self.xp.asarray(np.asarray(to_host(p)).astype(self.dtype))
                       for name, p in source.items()}
        self.memory = ActivationMemory()
        self.local_heads = config.num_heads
        self.input_region = self.output_region = IdentityRegion
        self.tp, self.tensor_parallel = None, False
        self.head_slice = self.ff_columns = slice(None)  # every head and column here

    # ------------------------------------------------------------------ the two stacks

    def encode(self, input_ids, attention_mask=None, dropout_seed=None):
        """input_ids int (B, Te), attention_mask (B, Te) nonzero for real tokens or None ->
        (encoder output (B, Te, C), cache)."""
        x, lookup = self.embed_forward(input_ids)
        x, embedding_mask = self.embed_dropout("encoder", x, dropout_seed)
        bias, buckets = self.position_bias_forward("encoder", x.shape[1], x.shape[1])
        layers = []
        for i in range(self.config.num_layers):
            x, cache = self.encoder_layer_forward(i, x, attention_mask, bias, dropout_seed)
            layers.append(self.memory.hold(cache))
        out, norm = self.final_norm_forward("encoder", x, dropout_seed)
        return out, {"lookup": lookup, "embedding_mask": embedding_mask, "buckets": buckets,
                     "layers": layers, "norm": norm}

    def encode_backward(self, cache, dout, grads):
        """Adds the encoder's gradients (the shared embedding's to what is there) to grads."""
        dx, norm_grads = self.final_norm_backward("encoder", cache["norm"], dout)
        grads.update(norm_grads)
        dbias = 0
        for i in reversed(range(self.config.num_layers)):
            layer = cache["layers"].pop()
            self.memory.release(layer)
            dx, layer_grads, layer_dbias = self.encoder_layer_backward(i, layer, dx)
            grads.update(layer_grads)
            dbias = dbias + layer_dbias
        grads.update(self.position_bias_backward("encoder", cache["buckets"], dbias))
        dx = ops.dropout_backward(dx, cache["embedding_mask"])
        grads["shared.weight"] += self.embed_backward(cache["lookup"], dx)

    def decode(self, decoder_input_ids, encoder_out, attention_mask=None, dropout_seed=None):
        """decoder_input_ids int (B, Td), encoder_out (B, Te, C) -> (hidden (B, Td, C), cache);
        attention_mask: the encoder's padding mask."""
        y, lookup = self.embed_forward(decoder_input_ids)
        y, embedding_mask = self.embed_dropout("decoder", y, dropout_seed)
        T = y.shape[1]
        bias, buckets = self.position_bias_forward("decoder", T, T)
        layers = []
        for i in range(self.config.num_decoder_layers):
            y, cache = self.decoder_layer_forward(i, y, encoder_out, attention_mask, bias,
                                                  dropout_seed)
            layers.append(self.memory.hold(cache))
        out, norm = self.final_norm_forward("decoder", y, dropout_seed)
        return out, {"lookup": lookup, "embedding_mask": embedding_mask, "buckets": buckets,
                     "layers": layers, "norm": norm}

    def decode_backward(self, cache, dy, grads):
        """-> the encoder output's gradient, summed over the decoder layers; grads filled in."""
        dy, norm_grads = self.final_norm_backward("decoder", cache["norm"], dy)
        grads.update(norm_grads)
        dbias, dencoder_out = 0, 0
        for i in reversed(range(self.config.num_decoder_layers)):
            layer = cache["layers"].pop()
            self.memory.release(layer)
            dy, layer_grads, layer_dbias, share = self.decoder_layer_backward(i, layer, dy)
            grads.update(layer_grads)
            dbias, dencoder_out = dbias + layer_dbias, dencoder_out + share
        grads.update(self.position_bias_backward("decoder", cache["buckets"], dbias))
        dy = ops.dropout_backward(dy, cache["embedding_mask"])
        grads["shared.weight"] += self.embed_backward(cache["lookup"], dy)
        return self.input_region.backward(dencoder_out, self.tp)

    # ------------------------------------------------------------------ whole model

    def decoder_logits(self, input_ids, decoder_input_ids, attention_mask=None):
        """Logits (B, Td, vocab_size) of the decoder inputs given the encoder inputs."""
        encoder_out, cache = self.encode(input_ids, attention_mask)
        self._release(cache)
        y, cache = self.decode(decoder_input_ids, encoder_out, attention_mask)
        self._release(cache)
        return self.head_logits(y)

    def seq2seq_loss_and_grads(self, input_ids, labels, attention_mask=None, dloss=1.0,
                               dropout_seed=None):
        """One forward+backward with teacher forcing: the decoder reads `labels` shifted right.

        input_ids, labels int (B, Te), (B, Td) -> (mean cross-entropy over labels != -100,
        gradients of dloss × that loss, like params). dropout_seed: the micro-batch's masks (None:
        no dropout)."""
        decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id,
                                        self.config.pad_token_id)
        encoder_out, encoder_cache = self.encode(input_ids, attention_mask, dropout_seed)
        y, decoder_cache = self.decode(decoder_input_ids, encoder_out, attention_mask, dropout_seed)
        loss, head_cache = self.head_forward(y, labels)
        dy, grads = self.head_backward(head_cache, dloss)
        dencoder_out = self.decode_backward(decoder_cache, dy, grads)
        self.encode_backward(encoder_cache, dencoder_out, grads)
        return loss, {name: grads[name] for name in self.params}

    # ---- the trainers' interface (model/families.py): packed [encoder ids | decoder ids] -------

    def _unpack(self, packed):
        split = self.config.encoder_length
        if packed.shape[1] <= split:
            raise ValueError(f"packed T5 inputs of {packed.shape[1]} tokens hold no decoder tokens "
                             f"after the {split} encoder tokens of block_size "
                             f"{self.config.block_size}")
        return packed[:, :split], packed[:, split:]

    def forward(self, packed):
        """packed int (B, Te + Td) = [encoder ids | decoder input ids] (Te = config.encoder_length)
        -> logits (B, Td, vocab_size)."""
        return self.decoder_logits(*self._unpack(packed))

    def loss(self, packed, labels) -> float:
        """Inference loss, no dropout: the training loss of (packed, labels) (see loss_and_grads)."""
        input_ids, decoder_input_ids = self._unpack(packed)
        encoder_out, cache = self.encode(input_ids)
        self._release(cache)
        y, cache = self.decode(decoder_input_ids, encoder_out)
        self._release(cache)
        loss, cache = self.head_forward(y, labels)
        self.memory.release(cache)
        return loss

    def loss_and_grads(self, packed, labels, dropout_seed=None, dloss=1.0):
        """packed as for `forward`, labels int (B, Td) -> (loss, grads), as seq2seq_loss_and_grads."""
        input_ids, decoder_input_ids = self._unpack(packed)
        if decoder_input_ids.shape != labels.shape:
            raise ValueError(f"packed decoder inputs {tuple(decoder_input_ids.shape)} do not match "
                             f"labels {tuple(labels.shape)}")
        return self.seq2seq_loss_and_grads(input_ids, labels, None, dloss, dropout_seed)

    def _release(self, cache):
        for layer in cache["layers"]:
            self.memory.release(layer)

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory, tokenizer=None):
        """Writes model.safetensors + config.json in transformers' T5 format, atomically."""
        save_checkpoint(directory, {name: to_host(p) for name, p in self.params.items()},
                        self.config, tokenizer)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None):
        """Loads a checkpoint written by ringpipe or by transformers' T5ForConditionalGeneration."""
        config, params = load_checkpoint(directory, dtype=dtype, device=device)
        return cls(config, params=params)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids, max_new_tokens, attention_mask=None, temperature=0.0,
                 top_k=None, seed=None):
        """Decoder tokens (B, 1 + n), from the start token; see model/t5/generation.py."""
        return generation.generate(self, input_ids, max_new_tokens, attention_mask, temperature,
                                   top_k, seed)

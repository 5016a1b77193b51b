"""Generation for encoder-decoder models (T5; BART later): the encoder runs once, the decoder one cached step per token.

A model takes part through three methods (see `flaxtrain.models.t5.T5ForConditionalGeneration`):
  model.apply({"params": params}, input_ids [B, S], attention_mask [B, S], method=model.encode)
      -> encoder_hidden [B, S, D]
  model.init_cache(batch_size, max_length) -> cache    (plain method, no params: zeroed self-attention buffers)
  model.apply({"params": params}, decoder_input_ids [B, T], encoder_hidden, attention_mask, cache=cache,
              method=model.decode) -> (logits [B, T, V] float32, cache advanced by T tokens)
The first decode call projects the cross-attention keys/values of every layer from encoder_hidden into the cache;
later calls pass encoder_hidden=None and read them from there.

Output convention (as `flaxtrain.generate` for decoder-only models): the new tokens [B, max_new_tokens] int32, without
the decoder start token; after a row's end-of-sequence token the row holds pad_token_id. The loop is a
`lax.while_loop` that stops early once every row has finished. Beam search would sit beside `greedy_search`, reusing
`_start` and `_decode_step` on encoder outputs and caches repeated per beam.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _start(model, params, input_ids, attention_mask, max_length: int):
    """Runs the encoder once -> (encoder_hidden [B, S, D], an empty decoder cache for max_length tokens)."""
    encoder_hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    return encoder_hidden, model.init_cache(input_ids.shape[0], max_length)


def _decode_step(model, params, cache, tokens, encoder_hidden, attention_mask):
    """tokens [B] -> (logits [B, V] float32 for the next token, cache)."""
    logits, cache = model.apply({"params": params}, tokens[:, None], encoder_hidden, attention_mask, cache=cache,
                                method=model.decode)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "decoder_start_token_id", "eos_token_id",
                                             "pad_token_id"))
def _greedy_search(model, params, input_ids, attention_mask, *, max_new_tokens: int, decoder_start_token_id: int,
                   eos_token_id: tuple[int, ...], pad_token_id: int):
    batch_size = input_ids.shape[0]
    # The decoder reads at most max_new_tokens tokens: the start token and all but the last new one.
    encoder_hidden, cache = _start(model, params, input_ids, attention_mask, max_new_tokens)
    eos = jnp.asarray(eos_token_id or (-1,), jnp.int32)

    def record(tokens, done, logits, i):
        token = jnp.where(done, pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return tokens.at[:, i].set(token), done | jnp.isin(token, eos), token

    start = jnp.full((batch_size,), decoder_start_token_id, jnp.int32)
    # Outside the loop: this call adds the cross-attention keys/values to the cache, so the loop's carry keeps one
    # structure from then on.
    logits, cache = _decode_step(model, params, cache, start, encoder_hidden, attention_mask)
    tokens = jnp.full((batch_size, max_new_tokens), pad_token_id, jnp.int32)
    tokens, done, token = record(tokens, jnp.zeros(batch_size, bool), logits, 0)

    def body(carry):
        i, tokens, done, token, cache = carry
        logits, cache = _decode_step(model, params, cache, token, None, attention_mask)
        tokens, done, token = record(tokens, done, logits, i)
        return i + 1, tokens, done, token, cache

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    return lax.while_loop(cond, body, (jnp.int32(1), tokens, done, token, cache))[1]


def greedy_search(model, params, input_ids, attention_mask=None, *, max_new_tokens: int,
                  decoder_start_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None) -> jax.Array:
    """Greedy decoding: input_ids [B, S] (attention_mask [B, S], 1 = token, 0 = pad, either side; None = no padding)
    -> new tokens [B, max_new_tokens] int32, padded with pad_token_id after each row's end-of-sequence token.

    The token ids default to model.config's (decoder_start_token_id, eos_token_id, pad_token_id). Compiled once
    per (model, shapes, settings); callable inside the caller's jit or shard_map as well.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    cfg = model.config
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
    return _greedy_search(
        model, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
        max_new_tokens=int(max_new_tokens),
        decoder_start_token_id=int(cfg.decoder_start_token_id if decoder_start_token_id is None
                                   else decoder_start_token_id),
        eos_token_id=tuple(int(t) for t in eos),
        pad_token_id=int(cfg.pad_token_id if pad_token_id is None else pad_token_id))

"""Text generation with a key/value cache: greedy decoding and sampling, compiled once per shape.

Decoder-only models for now (GPT-2, Llama-style). A model takes part through two methods:
  model.init_cache(batch_size, max_length) -> cache
  model.apply({"params": params}, input_ids [B, T], attention_mask [B, T], position_ids [B, T], cache=cache)
      -> (logits [B, T, V] float32, cache with the T new tokens written at cache["index"])
The cache has the layout every family shares (`flaxtrain.models.attention.init_cache`); a decoder's holds "self":
{"key", "value"} [L, B, S, K, H] in the computation dtype, stacked on the layer axis so that the scanned layers read
and write their slice; "mask" [B, S] bool, True where a slot holds a real token (`causal_mask` below marks the new
tokens'); "index" int32 [], the next slot to write. All rows write the same slot, which is why prompts are
left-padded: the last prompt token of every row then sits at slot P - 1 and the new tokens follow it.

Positions count the real tokens (cumsum of the mask - 1, as transformers' `generate` does), so a left-padded row
computes exactly what it would unpadded. The loop is a `lax.while_loop` of one cached forward step per new token
that stops early once every row has produced an end-of-sequence token; rows that finished are padded. `_decode`
(the loop and token selection) knows nothing of the model beyond a step function, for encoder-decoders to share.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def causal_mask(attention_mask: jax.Array, cache: dict | None = None,
                sliding_window: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Which keys each new token attends to.

    attention_mask [B, T] (1 = token, 0 = pad) of the T new tokens -> (mask [B, 1, T, S] bool, valid [B, S] bool).
    Without a cache the keys are the new tokens (S = T); with one they are the cache's S slots, the new tokens
    being written at cache["index"], and `valid` is the cache's mask with theirs written in. A query sees the real
    keys at or before its slot and, with a sliding window W, only the last W of those slots (itself included), as
    transformers counts it (slots, not positions, so padding inside the window counts).
    """
    valid = attention_mask.astype(bool)
    start = 0
    if cache is not None:
        start = cache["index"]
        valid = lax.dynamic_update_slice(cache["mask"], valid, (0, start))
    query = start + jnp.arange(attention_mask.shape[1])[:, None]  # [T, 1] slots of the new tokens
    key = jnp.arange(valid.shape[1])[None, :]  # [1, S]
    allowed = key <= query
    if sliding_window is not None:
        allowed &= key > query - sliding_window
    return valid[:, None, None, :] & allowed[None, None], valid


def default_positions(input_ids: jax.Array, cache: dict | None = None) -> jax.Array:
    """transformers' default position_ids [B, T] of the new tokens input_ids [B, T]: consecutive from the first (from
    cache["index"] with a cache, else 0), padding ignored. (Generation passes positions counted from the mask.)"""
    start = 0 if cache is None else cache["index"]
    return jnp.broadcast_to(start + jnp.arange(input_ids.shape[1]), input_ids.shape)


def next_cache(cache: dict | None, self_cache: dict, valid: jax.Array, length: int) -> dict | None:
    """A decoder's cache after `length` new tokens (None without one): "self" the scanned layers' updated
    key/value buffers, "mask" `valid` from causal_mask or layer_masks, "index" moved past the new tokens."""
    return None if cache is None else {"index": cache["index"] + length, "self": self_cache, "mask": valid}


def layer_masks(attention_mask: jax.Array, cache: dict | None,
                layer_windows: tuple[int | None, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The masks of layers with different sliding windows (None: full attention), for one nn.scan over them all:
    (masks [M, B, 1, T, S] bool, one per distinct window, which [L] int32: each layer's index into masks, valid
    [B, S] bool as causal_mask's)."""
    windows = sorted(set(layer_windows), key=lambda w: w or 0)
    masks = [causal_mask(attention_mask, cache, w) for w in windows]
    which = jnp.array([windows.index(w) for w in layer_windows], jnp.int32)
    return jnp.stack([m for m, _ in masks]), which, masks[0][1]


def process_logits(logits: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
    """[B, V] -> [B, V] float32 with the tokens that sampling must not pick set to -inf: temperature, then top-k,
    then top-p (nucleus), in the order transformers applies them. top_k=0 and top_p=1.0 turn a filter off. The
    settings may be traced: one compilation serves any of them."""
    logits = logits.astype(jnp.float32) / temperature
    ranked = -jnp.sort(-logits, axis=-1)  # [B, V], most likely first
    vocab = logits.shape[-1]
    kth = jnp.where(top_k > 0, ranked[:, jnp.clip(top_k, 1, vocab) - 1], -jnp.inf)  # [B]
    ranked = jnp.where(ranked >= kth[:, None], ranked, -jnp.inf)
    # Top-p keeps a token when the probability of the tokens ranked above it is below top_p: the smallest set
    # whose mass reaches top_p, never less than the most likely token. `above` grows along the ranking, so the
    # kept tokens are a prefix of it and the last one's logit is the threshold.
    probs = jax.nn.softmax(ranked, axis=-1)
    above = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.maximum(jnp.sum((above < top_p) | (top_p >= 1.0), axis=-1), 1)  # [B]
    threshold = jnp.take_along_axis(ranked, kept[:, None] - 1, axis=-1)  # [B, 1]; -inf when top-k cut first
    return jnp.where((logits >= kth[:, None]) & (logits >= threshold), logits, -jnp.inf)


def _decode(step, logits: jax.Array, cache: Any, positions: jax.Array, rng: jax.Array, eos_token_ids: jax.Array,
            pad_token_id: jax.Array, sampling: tuple | None, *, max_new_tokens: int) -> jax.Array:
    """The generation loop, independent of the model's structure (an encoder-decoder passes its decoder step).

    step(cache, tokens [B], positions [B]) -> (logits [B, V], cache); logits [B, V]: those of the first new token;
    positions [B]: the position the first new token will have; eos_token_ids [E] int32; sampling: None for greedy,
    else (temperature, top_k, top_p) for `process_logits`. Returns the new tokens [B, max_new_tokens].
    """
    batch_size = logits.shape[0]

    def select(logits, i):
        if sampling is None:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = process_logits(logits, *sampling)
        return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1).astype(jnp.int32)

    def record(tokens, done, token, i):
        token = jnp.where(done, pad_token_id, token)
        return tokens.at[:, i].set(token), done | jnp.isin(token, eos_token_ids), token

    tokens = jnp.full((batch_size, max_new_tokens), pad_token_id, jnp.int32)
    tokens, done, token = record(tokens, jnp.zeros(batch_size, bool), select(logits, 0), 0)

    def body(carry):
        i, tokens, done, token, positions, cache = carry
        logits, cache = step(cache, token, positions)
        tokens, done, token = record(tokens, done, select(logits, i), i)
        return i + 1, tokens, done, token, positions + 1, cache

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    return lax.while_loop(cond, body, (jnp.int32(1), tokens, done, token, positions, cache))[1]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate_decoder_only(model, params, input_ids, attention_mask, rng, eos_token_ids, pad_token_id, sampling, *,
                           max_new_tokens):
    batch_size, prompt_length = input_ids.shape
    cache = model.init_cache(batch_size, prompt_length + max_new_tokens)
    position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask, position_ids, cache=cache)

    def step(cache, token, positions):
        logits, cache = model.apply({"params": params}, token[:, None], jnp.ones_like(token)[:, None],
                                    positions[:, None], cache=cache)
        return logits[:, 0], cache

    return _decode(step, logits[:, -1], cache, jnp.sum(attention_mask, axis=1), rng, eos_token_ids, pad_token_id,
                   sampling, max_new_tokens=max_new_tokens)


def fetchable(x):
    """x, or this host's copy of it when it is a global array whole on every device (as parallel.on_every_device
    makes, on several hosts)."""
    return x.addressable_data(0) if isinstance(x, jax.Array) and x.is_fully_replicated else x


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             rng: jax.Array | None = None) -> jax.Array:
    """New tokens [B, max_new_tokens] int32 after left-padded prompts input_ids [B, P] (attention_mask [B, P]:
    1 = token, 0 = pad, pads first; None = no padding).

    Greedy unless do_sample (then `rng` is required, and temperature/top_k/top_p shape the distribution). After a
    row produces one of `eos_token_id` its remaining tokens are `pad_token_id`, and the loop stops when every row
    has. Compiled once per model, shapes, max_new_tokens and do_sample (not per sampling setting or token id);
    each new token costs one cached forward step.
    """
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    try:
        mask = np.asarray(fetchable(attention_mask))
    except jax.errors.TracerArrayConversionError:  # called under a jit of the caller's: cannot check
        mask = None
    if mask is not None and (np.diff(mask, axis=1) < 0).any():
        raise ValueError("generate takes left-padded prompts (pads first, as tokenizer(padding_side='left') "
                         "writes them); a row of attention_mask has a pad after a token.")
    if do_sample and rng is None:
        raise ValueError("do_sample=True needs an rng")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos += [-1] * (4 - len(eos))  # -1 matches no token; a fixed 4 slots, so other eos ids do not recompile
    return _generate_decoder_only(
        model, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
        jax.random.key(0) if rng is None else rng, jnp.asarray(eos, jnp.int32), jnp.int32(pad_token_id),
        (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)) if do_sample else None,
        max_new_tokens=max_new_tokens)

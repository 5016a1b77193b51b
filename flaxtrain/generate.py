"""Text generation with a key/value cache: greedy decoding and sampling, compiled once per shape.

Decoder-only models (GPT-2, Llama-style; encoder-decoders: generate_seq2seq). A model takes part through two methods:
  model.init_cache(batch_size, max_length) -> cache
  model.apply({"params": params}, input_ids [B, T], attention_mask [B, T], position_ids [B, T], cache=cache)
      -> (logits [B, T, V] float32, cache with the T new tokens written at cache["index"])
The cache has the layout every family shares (`flaxtrain.models.attention.init_cache`); a decoder's holds "self":
{"key", "value"} [L, B, S, K, H] in the computation dtype, stacked on the layer axis so that the scanned layers read
and write their slice; "mask" [B, S] bool, True where a slot holds a real token (`causal_mask` there marks the new
tokens'); "index" int32 [], the next slot to write. All rows write the same slot, which is why prompts are
left-padded: the last prompt token of every row then sits at slot P - 1 and the new tokens follow it.

Positions count the real tokens (cumsum of the mask - 1, as transformers' `generate` does), so a left-padded row
computes exactly what it would unpadded. The loop is a `lax.while_loop` of one cached forward step per new token
that stops early once every row has produced an end-of-sequence token; rows that finished are padded. `decode`
(the loop and token selection) knows nothing of the model beyond a step function: generate_seq2seq's greedy search
runs it too. The masks and positions of the new tokens are the models' (flaxtrain/models/attention.py).
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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


def decode(step, logits: jax.Array, state: Any, *, max_new_tokens: int, eos_token_ids: jax.Array,
           pad_token_id: jax.Array | int, prefix: jax.Array | None = None, process=None,
           sampling: tuple | None = None, rng: jax.Array | None = None) -> jax.Array:
    """The one decoding loop (greedy or sampling), independent of the model: decoder-only `generate` and
    generate_seq2seq's greedy search run it; beam search is its own loop there.

    step(state, tokens [B]) -> (logits [B, V], state): one cached forward step, `state` whatever it carries (a
    cache, positions); logits [B, V]: those of the first new token, computed by the caller (a prompt's forward pass,
    or an encoder-decoder's first step, which fills its cache's cross-attention entries and so gives the loop's
    carry its final structure). prefix [B, P] int32: tokens before the new ones for `process` to see (a decoder
    start token) or None; process(logits [B, V], sequences [B, P + max_new_tokens], i) -> logits [B, V]: the logits
    processors for new token i (sequences hold the prefix and the tokens so far), or None; eos_token_ids [E] int32;
    sampling: None for greedy, else (temperature, top_k, top_p) for `process_logits`, drawn with rng folded with i.
    Returns the new tokens [B, max_new_tokens], pad_token_id after each row's end-of-sequence token.
    """
    batch_size = logits.shape[0]
    offset = 0 if prefix is None else prefix.shape[1]
    sequences = jnp.full((batch_size, offset + max_new_tokens), pad_token_id, jnp.int32)
    if prefix is not None:
        sequences = sequences.at[:, :offset].set(prefix)

    def select(sequences, done, logits, i):
        if process is not None:
            logits = process(logits, sequences, i)
        if sampling is None:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            logits = process_logits(logits, *sampling)
            token = jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1).astype(jnp.int32)
        token = jnp.where(done, pad_token_id, token)
        return sequences.at[:, offset + i].set(token), done | jnp.isin(token, eos_token_ids), token

    sequences, done, token = select(sequences, jnp.zeros(batch_size, bool), logits, 0)

    def body(carry):
        i, sequences, done, token, state = carry
        logits, state = step(state, token)
        sequences, done, token = select(sequences, done, logits, i)
        return i + 1, sequences, done, token, state

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    return lax.while_loop(cond, body, (jnp.int32(1), sequences, done, token, state))[1][:, offset:]


def per_layer(tree: Any) -> tuple:
    """A tree of arrays stacked on a leading layer axis [L, ...] -> a tuple of L trees, one per layer."""
    return tuple(jax.tree.map(lambda x, i=i: x[i], tree) for i in range(jax.tree.leaves(tree)[0].shape[0]))


def unroll_layers(model, params: dict | None, cache: dict) -> tuple[dict | None, dict]:
    """(params, cache) for the decoding loop: a model that names its scanned layers' params `model.layer_stack` (a
    path, e.g. ("transformer", "h")) gets them, and the stacked cache entries (cache["self"] {"key", "value"} [L, B,
    S, K, H], and an encoder-decoder's filled cache["cross"], whose keys and values go keys last, [B, K, H, S], as
    the attention's products read them), split per layer (`per_layer`); its cached forward pass then runs the
    layers unrolled, each on its own buffers. The split copies the weights once per call, outside the loop; inside
    it a scan would slice (copy) every layer's weights and cache buffers on every step (XLA does not hoist slices
    out of loops): on a CPU gpt2-small and bart-small went from 0.5-0.76 of the original's generation speed to
    1.0-1.9 (benchmarks/README.md). Called after the first (prompt or encoder-reading) step, which stays as the
    model runs it, so that the unrolled layers are compiled once, in the loop. Other models: as they are. params
    None: None."""
    path = getattr(model, "layer_stack", None)
    if path is None:
        return params, cache

    def split(tree, path):
        return per_layer(tree) if not path else {**tree, path[0]: split(tree[path[0]], path[1:])}

    cache = {**cache, "self": per_layer(cache["self"])}
    if jax.tree.leaves(cache.get("cross")):  # [L, B, S, K, H] -> per layer [B, K, H, S]
        cache["cross"] = per_layer(jax.tree.map(lambda x: jnp.transpose(x, (0, 1, 3, 4, 2)), cache["cross"]))
    return None if params is None else split(params, path), cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate_decoder_only(model, params, input_ids, attention_mask, rng, eos_token_ids, pad_token_id, sampling, *,
                           max_new_tokens):
    batch_size, prompt_length = input_ids.shape
    cache = model.init_cache(batch_size, prompt_length + max_new_tokens)
    position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask, position_ids, cache=cache)
    params, cache = unroll_layers(model, params, cache)

    def step(state, token):
        cache, positions = state
        logits, cache = model.apply({"params": params}, token[:, None], jnp.ones_like(token)[:, None],
                                    positions[:, None], cache=cache)
        return logits[:, 0], (cache, positions + 1)

    # The first new token's position: the count of real prompt tokens.
    return decode(step, logits[:, -1], (cache, jnp.sum(attention_mask, axis=1)), max_new_tokens=max_new_tokens,
                  eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, sampling=sampling, rng=rng)


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
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):  # under a caller's jit
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

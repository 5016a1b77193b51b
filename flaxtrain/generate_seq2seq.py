"""Generation for encoder-decoder models (T5, BART): the encoder runs once, the decoder one cached step per token.

A model takes part through three methods (see `flaxtrain.models.t5.T5ForConditionalGeneration`):
  model.apply({"params": params}, input_ids [B, S], attention_mask [B, S], method=model.encode)
      -> encoder_hidden [B, S, D]
  model.init_cache(batch_size, max_length) -> cache    (plain method, no params)
  model.apply({"params": params}, decoder_input_ids [B, T], encoder_hidden, attention_mask, cache=cache,
              method=model.decode) -> (logits [B, T, V] float32, cache advanced by T tokens)
The cache has the layout every family shares (`flaxtrain.models.attention.init_cache`): "index", the decoder's
self-attention keys/values cache["self"] {"key", "value"} [L, B, T_max, N, H], zeros at first, and cache["cross"],
empty until the first decode call projects the cross-attention keys/values of every layer from encoder_hidden into
it ({"key", "value"} [L, B, S, N, H]); later calls pass encoder_hidden=None and read them from there.

`generate` is the entry point: greedy search (num_beams=1) or beam search, both with transformers' logits processors
(no_repeat_ngram_size, forced_bos_token_id, forced_eos_token_id) and, for beams, exactly transformers 5's beam
search (`GenerationMixin._beam_search`): the same candidates, length penalty, finished-hypothesis bookkeeping and
stopping rules, so that the same weights give the same tokens. Output convention (as `flaxtrain.generate` for
decoder-only models): the new tokens [B, max_new_tokens] int32, without the decoder start token; after a row's
end-of-sequence token the row holds pad_token_id. Both loops are `lax.while_loop`s that stop early as transformers
does; greedy search is flaxtrain.generate's `decode` (the loop decoder-only models run), beam search its own.

Beam search runs the decoder on B*K rows (K = num_beams; the encoder output and mask repeated K times) and reorders
the self-attention cache after each step along its batch axis, which `_cache_batch_axes` finds by comparing the
shapes of two `init_cache` sizes. Cache entries that the first decode call adds (cache["cross"]) are not reordered:
they come from the encoder, the same for all beams of one input, and beams never change inputs.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxtrain.generate import decode, unroll_layers

# transformers' stand-in for "impossible" in beam scores (an added -1e9, not -inf, so sums stay ordered).
NEG = -1.0e9


# Up to this many forced end-of-sequence ids, padded with -1 (no token), so that they are data, not compiled in.
MAX_FORCED_EOS = 4


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The settings that shape the compiled loop (a static, hashable jit argument). The others are traced `knobs`,
    so that changing them does not recompile: {"forced_bos": int32 [] (-1: none), "forced_eos": int32
    [MAX_FORCED_EOS] (-1: none), "penalty": float32 [max_new_tokens] (length ** length_penalty for lengths 1, 2,
    ...), "early_true": bool [] (early_stopping is True), "best_at_max": bool [] (early_stopping "never" with a
    positive length penalty: the best running score is judged at max length)}."""

    max_new_tokens: int
    decoder_start_token_id: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    num_beams: int = 1
    no_repeat_ngram_size: int = 0


def _start(model, params, input_ids, attention_mask, max_length: int):
    """Runs the encoder once -> (encoder_hidden [B, S, D], an empty decoder cache for max_length tokens)."""
    encoder_hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    return encoder_hidden, model.init_cache(input_ids.shape[0], max_length)


def _decode_step(model, params, cache, tokens, encoder_hidden, attention_mask):
    """tokens [B] -> (logits [B, V] float32 for the next token, cache)."""
    logits, cache = model.apply({"params": params}, tokens[:, None], encoder_hidden, attention_mask, cache=cache,
                                method=model.decode)
    return logits[:, 0], cache


def _ban_repeated_ngrams(scores, sequences, length, n: int):
    """transformers' NoRepeatNGramLogitsProcessor: -inf for every token that would complete an n-gram already in the
    first `length` tokens of sequences [N, T] (the decoder start token included). scores [N, V]."""
    num_rows, max_length = sequences.shape
    windows = max_length - n + 1  # n-gram starts j = 0 .. T - n; valid while j + n <= length
    prefix = lax.dynamic_slice_in_dim(sequences, jnp.maximum(length - n + 1, 0), n - 1, axis=1)  # [N, n-1]
    match = jnp.arange(windows)[None, :] + n <= length
    for k in range(n - 1):
        match &= sequences[:, k:k + windows] == prefix[:, k:k + 1]
    banned = jnp.zeros(scores.shape, bool).at[jnp.arange(num_rows)[:, None], sequences[:, n - 1:]].max(match)
    return jnp.where(banned, -jnp.inf, scores)


def _process_scores(scores, sequences, length, s: _Settings, knobs: dict):
    """transformers' logits processors, in its order, for the token at position `length` (traced) of the decoder
    sequences [N, T] (start token at 0; the first `length` are real): scores [N, V] float32 -> [N, V]."""
    if s.no_repeat_ngram_size:
        scores = _ban_repeated_ngrams(scores, sequences, length, s.no_repeat_ngram_size)
    vocab = jnp.arange(scores.shape[-1])
    # Forced BOS: only that token at the first new position; forced EOS: only those at the last one of max length.
    bos, eos = knobs["forced_bos"], knobs["forced_eos"]
    scores = jnp.where((length == 1) & (bos >= 0), jnp.where(vocab == bos, 0.0, -jnp.inf), scores)
    forced_end = (length == s.max_new_tokens) & jnp.any(eos >= 0)
    return jnp.where(forced_end, jnp.where(jnp.isin(vocab, eos), 0.0, -jnp.inf), scores)


def _eos(s: _Settings):
    return jnp.asarray(s.eos_token_id or (-1,), jnp.int32)  # -1 matches no token


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _greedy_search(model, params, input_ids, attention_mask, knobs: dict, s: _Settings):
    """generate.decode over the decoder, its sequences starting with the decoder start token."""
    # The decoder reads at most max_new_tokens tokens: the start token and all but the last new one.
    encoder_hidden, cache = _start(model, params, input_ids, attention_mask, s.max_new_tokens)
    start = jnp.full((input_ids.shape[0], 1), s.decoder_start_token_id, jnp.int32)
    # Outside the loop: this call adds the cross-attention keys/values to the cache, so the loop's carry keeps one
    # structure from then on; then the layers are split for the loop (`unroll_layers`).
    logits, cache = _decode_step(model, params, cache, start[:, 0], encoder_hidden, attention_mask)
    params, cache = unroll_layers(model, params, cache)

    def step(cache, token):
        return _decode_step(model, params, cache, token, None, attention_mask)

    def process(logits, sequences, i):
        # (transformers processes raw logits in greedy search; the forced and banned tokens pick the same argmax.)
        return _process_scores(logits, sequences, i + 1, s, knobs)

    return decode(step, logits, cache, max_new_tokens=s.max_new_tokens, eos_token_ids=_eos(s),
                  pad_token_id=s.pad_token_id, prefix=start, process=process)


def _cache_batch_axes(model, max_length: int) -> dict:
    """{tree path: batch axis} of the leaves of `model.init_cache` in the decoding loop's layout (`unroll_layers`),
    found from the shapes of two batch sizes without allocating; leaves without one (the write index) are absent."""
    two, three = (jax.tree_util.tree_flatten_with_path(jax.eval_shape(
        lambda: unroll_layers(model, None, model.init_cache(b, max_length))[1]))[0] for b in (2, 3))
    axes = {}
    for (path, a), (_, b) in zip(two, three):
        differ = [axis for axis, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(differ) > 1 or (differ and (a.shape[differ[0]], b.shape[differ[0]]) != (2, 3)):
            raise ValueError(f"init_cache leaf {jax.tree_util.keystr(path)} has no single batch axis: "
                             f"{a.shape} for batch 2, {b.shape} for batch 3")
        if differ:
            axes[path] = differ[0]
    return axes


def _reorder_cache(cache, rows, axes: dict):
    """Takes `rows` [B*K] of every leaf of `cache` that has a batch axis in `axes`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.take(x, rows, axis=axes[path]) if path in axes else x, cache)


def _take_beams(x, index):
    """x [B, W, ...], index [B, K] -> x[b, index[b, k], ...] [B, K, ...] (transformers' `_gather_beams`)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _beam_search(model, params, input_ids, attention_mask, knobs: dict, s: _Settings):
    """transformers 5's `_beam_search` step for step (names follow it), on static shapes: B inputs, K beams,
    W = K * max(2, 1 + number of eos ids) candidates per input and step, T = 1 + max_new_tokens decoder tokens."""
    batch_size, num_beams, max_length = input_ids.shape[0], s.num_beams, s.max_new_tokens + 1
    num_candidates = max(2, 1 + len(s.eos_token_id)) * num_beams
    encoder_hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    encoder_hidden, attention_mask = (jnp.repeat(x, num_beams, axis=0) for x in (encoder_hidden, attention_mask))
    cache = model.init_cache(batch_size * num_beams, s.max_new_tokens)
    cache_axes = _cache_batch_axes(model, s.max_new_tokens)
    penalty, early_true = knobs["penalty"], knobs["early_true"]

    def select(state, logits, i):
        """Chooses the tokens at position cur_len = i + 1 from logits [B*K, V] of the running beams."""
        cur_len = i + 1
        running, running_scores = state["running"], state["running_scores"]
        log_probs = _process_scores(jax.nn.log_softmax(logits, axis=-1),
                                    running.reshape(batch_size * num_beams, max_length), cur_len, s, knobs)
        vocab_size = log_probs.shape[-1]
        accumulated = (log_probs.reshape(batch_size, num_beams, vocab_size) + running_scores[:, :, None])
        top_scores, top_index = lax.top_k(accumulated.reshape(batch_size, num_beams * vocab_size), num_candidates)
        top_beams, top_tokens = top_index // vocab_size, (top_index % vocab_size).astype(jnp.int32)
        top_sequences = _take_beams(running, top_beams).at[:, :, cur_len].set(top_tokens)  # [B, W, T]
        hits = jnp.isin(top_tokens, _eos(s)) | (cur_len + 1 >= max_length)  # [B, W]

        # The best K candidates that did not finish run on.
        alive_scores = top_scores + hits.astype(jnp.float32) * NEG
        keep = lax.top_k(alive_scores, num_beams)[1]
        source = _take_beams(top_beams, keep)  # [B, K] running beam each new one continues

        # Finished candidates among the top K join the K best finished hypotheses, scored by length ** penalty.
        finished, improvable = state["finished"], state["improvable"]
        just_finished = hits & (jnp.arange(num_candidates) < num_beams)
        candidate = top_scores / penalty[i]
        candidate += (jnp.all(finished, axis=1, keepdims=True) & early_true).astype(jnp.float32) * NEG
        candidate += (~improvable).astype(jnp.float32) * NEG
        candidate += (~just_finished).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([state["scores"], candidate], axis=1)
        best = lax.top_k(merged_scores, num_beams)[1]
        sequences = _take_beams(jnp.concatenate([state["sequences"], top_sequences], axis=1), best)
        scores = _take_beams(merged_scores, best)
        finished = _take_beams(jnp.concatenate([finished, just_finished], axis=1), best)

        # transformers' `_check_early_stop_heuristic` and `_beam_search_has_unfinished_sequences`.
        running_scores = _take_beams(alive_scores, keep)
        best_running = running_scores[:, :1] / penalty[jnp.where(knobs["best_at_max"], s.max_new_tokens - 1, i)]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable &= jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        go = jnp.any(improvable) & ~(jnp.all(finished) & early_true) & ~jnp.all(hits)
        rows = (jnp.arange(batch_size)[:, None] * num_beams + source).reshape(-1)
        return dict(running=_take_beams(top_sequences, keep), running_scores=running_scores, sequences=sequences,
                    scores=scores, finished=finished, improvable=improvable, go=go, rows=rows)

    running = jnp.full((batch_size, num_beams, max_length), s.pad_token_id, jnp.int32)
    running = running.at[:, :, 0].set(s.decoder_start_token_id)
    state = dict(
        running=running,
        # Only the first beam is live at first: the others hold the same tokens and would duplicate its candidates.
        running_scores=jnp.zeros((batch_size, num_beams), jnp.float32).at[:, 1:].set(NEG),
        sequences=running, scores=jnp.full((batch_size, num_beams), NEG, jnp.float32),
        finished=jnp.zeros((batch_size, num_beams), bool), improvable=jnp.ones((batch_size, 1), bool))
    # Outside the loop: this call adds the cross-attention keys/values to the cache (see `_greedy_search`).
    logits, cache = _decode_step(model, params, cache, running[:, :, 0].reshape(-1), encoder_hidden, attention_mask)
    params, cache = unroll_layers(model, params, cache)
    state = select(state, logits, 0)

    def body(carry):
        i, state, cache = carry
        cache = _reorder_cache(cache, state["rows"], cache_axes)
        tokens = lax.dynamic_index_in_dim(state["running"], i, axis=2, keepdims=False).reshape(-1)
        logits, cache = _decode_step(model, params, cache, tokens, None, attention_mask)
        return i + 1, select(state, logits, i), cache

    def cond(carry):
        i, state, _ = carry
        return (i < s.max_new_tokens) & state["go"]

    state = lax.while_loop(cond, body, (jnp.int32(1), state, cache))[1]
    return state["sequences"][:, 0, 1:]


def _ids(value) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(t) for t in value or ())


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int, num_beams: int = 1,
             length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, early_stopping: bool | str = False,
             decoder_start_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, forced_bos_token_id: int | None = None,
             forced_eos_token_id: int | Sequence[int] | None = None) -> jax.Array:
    """Greedy (num_beams=1) or beam search: input_ids [B, S] (attention_mask [B, S], 1 = token, 0 = pad, either
    side; None = no padding) -> new tokens [B, max_new_tokens] int32 without the decoder start token, pad_token_id
    after each row's end-of-sequence token.

    The same tokens as transformers' `model.generate(input_ids, attention_mask, do_sample=False, num_beams=...,
    max_new_tokens=..., length_penalty=..., early_stopping=..., no_repeat_ngram_size=..., forced_bos_token_id=...,
    forced_eos_token_id=...)` (for beams: its best hypothesis, whose score is log-probability / generated length **
    length_penalty; early_stopping True, False or "never" as there). length_penalty and early_stopping do nothing for
    greedy search. The token ids default to model.config's (decoder_start_token_id, eos_token_id, pad_token_id;
    no forced tokens). Compiled once per (model, shapes, settings); callable inside the caller's jit.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    cfg = model.config
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    settings = _Settings(
        max_new_tokens=int(max_new_tokens),
        decoder_start_token_id=int(cfg.decoder_start_token_id if decoder_start_token_id is None
                                   else decoder_start_token_id),
        eos_token_id=_ids(cfg.eos_token_id if eos_token_id is None else eos_token_id),
        pad_token_id=int(cfg.pad_token_id if pad_token_id is None else pad_token_id),
        num_beams=int(num_beams), no_repeat_ngram_size=int(no_repeat_ngram_size))
    forced_eos = _ids(forced_eos_token_id)
    if len(forced_eos) > MAX_FORCED_EOS:
        raise ValueError(f"at most {MAX_FORCED_EOS} forced_eos_token_id, got {forced_eos}")
    # length ** length_penalty in float64, then float32: transformers divides float32 scores by a Python float.
    penalty = np.arange(1, max_new_tokens + 1, dtype=np.float64) ** float(length_penalty)
    knobs = dict(forced_bos=np.int32(-1 if forced_bos_token_id is None else forced_bos_token_id),
                 forced_eos=np.array(forced_eos + (-1,) * (MAX_FORCED_EOS - len(forced_eos)), np.int32),
                 penalty=penalty.astype(np.float32), early_true=np.bool_(early_stopping is True),
                 best_at_max=np.bool_(early_stopping == "never" and length_penalty > 0.0))
    search = _greedy_search if num_beams == 1 else _beam_search
    return search(model, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32), knobs,
                  settings)


def greedy_search(model, params, input_ids, attention_mask=None, *, max_new_tokens: int,
                  decoder_start_token_id: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None) -> jax.Array:
    """`generate` with num_beams=1 and no logits processors."""
    return generate(model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                    decoder_start_token_id=decoder_start_token_id, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id)

"""The attention, masks and key/value cache every family shares (flaxtrain/models/attention.py): the dropout path
against jax.nn.dot_product_attention in each family's configuration, soft-capping, the cache layout, and the causal
and sliding-window masks over a cache; long sequences' attention in query blocks against one call."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain.models import attention as attention_module
from flaxtrain.models.attention import (attention, causal_mask, chunked_attention, default_positions, init_cache,
                                        layer_masks, next_cache, write_cache)

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU.
key = functools.partial(jax.random.key, impl="rbg")


class Attend(nn.Module):
    """attention() inside a compact method, as the families call it."""

    rate: float

    @nn.compact
    def __call__(self, q, k, v, mask, bias, scale, softcap=None):
        return attention(q, k, v, mask, bias=bias, scale=scale, softcap=softcap, dropout_rate=self.rate,
                         deterministic=False)


def inputs(kv_heads):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(2, 5, 4, 8), *[(2, 7, kv_heads, 8)] * 2])


CASES = {  # (key/value heads, mask, bias, scale)
    # BERT/BART: padded keys.
    "padding": (4, jnp.arange(7)[None, None, None, :] < jnp.array([7, 4])[:, None, None, None], None, None),
    # GPT-2/Llama: grouped-query heads, causal over a cache with an empty first slot.
    "grouped": (2, jnp.tril(jnp.ones((5, 7), bool), 2)[None, None] & (jnp.arange(7) > 0), None, None),
    # T5: a per-head position bias, no scaling, a mask per head.
    "bias": (4, jnp.ones((1, 4, 5, 7), bool).at[:, 1:, :, -2:].set(False),
             jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 5, 7)), jnp.float32), 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dropout_path_matches_dot_product_attention(case):
    """The explicit softmax (taken while attention dropout is active) computes what jax.nn.dot_product_attention
    does: with a vanishing dropout rate the two agree."""
    kv_heads, mask, bias, scale = CASES[case]
    q, k, v = inputs(kv_heads)
    expected = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    np.testing.assert_array_equal(attention(q, k, v, mask, bias=bias, scale=scale), expected)
    got = Attend(1e-9).apply({}, q, k, v, mask, bias, scale, rngs={"dropout": key(2)})
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_grouped_heads_drop_as_repeated_heads():
    """Grouped-query attention with dropout is attention over the key/value heads repeated, dropout mask included:
    each query head's probabilities are dropped as they would be without the grouping."""
    _, mask, _, _ = CASES["grouped"]
    q, k, v = inputs(2)
    grouped = Attend(0.5).apply({}, q, k, v, mask, None, None, rngs={"dropout": key(3)})
    repeated = Attend(0.5).apply({}, q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), mask, None, None,
                                 rngs={"dropout": key(3)})
    np.testing.assert_array_equal(grouped, repeated)
    assert not np.allclose(grouped, Attend(0.5).apply({}, q, k, v, mask, None, None, rngs={"dropout": key(4)}))


def test_cache_layout_and_writes():
    decoder = init_cache(2, 3, 6, 2, 8, jnp.bfloat16)
    assert set(decoder) == {"index", "self", "mask"} and int(decoder["index"]) == 0
    assert decoder["self"]["key"].shape == decoder["self"]["value"].shape == (2, 3, 6, 2, 8)
    assert decoder["self"]["value"].dtype == jnp.bfloat16 and decoder["mask"].shape == (3, 6)
    assert not decoder["mask"].any()
    seq2seq = init_cache(2, 3, 6, 2, 8, jnp.float32, encoder_decoder=True)
    assert set(seq2seq) == {"index", "self", "cross"} and seq2seq["cross"] == {}

    layer = jax.tree.map(lambda x: x[0], decoder["self"])  # one layer's slice, as the scanned layers see it
    k, v = jnp.ones((3, 2, 2, 8), jnp.float32), jnp.full((3, 2, 2, 8), 2.0, jnp.float32)
    written = write_cache(layer, k, v, 3)
    assert written["key"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(written["key"][:, 3:5], 1.0)
    np.testing.assert_array_equal(written["value"][:, 3:5], 2.0)
    assert not written["key"][:, :3].any() and not written["value"][:, 5:].any()


def test_softcap():
    """gemma2's soft-capped logits, c * tanh(scale * q k^T / c) before the mask, with and without dropout; a cap far
    above the logits changes nothing."""
    _, mask, _, _ = CASES["grouped"]
    q, k, v = inputs(2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) * 0.3
    probs = jax.nn.softmax(jnp.where(mask, 0.5 * jnp.tanh(logits / 0.5), -jnp.inf), axis=-1)
    expected = jnp.einsum("bnts,bsnh->btnh", probs, jnp.repeat(v, 2, axis=2))
    np.testing.assert_allclose(attention(q, k, v, mask, scale=0.3, softcap=0.5), expected, atol=1e-6)
    got = Attend(1e-9).apply({}, q, k, v, mask, None, 0.3, 0.5, rngs={"dropout": key(2)})
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(attention(q, k, v, mask, scale=0.3, softcap=1e6),
                               attention(q, k, v, mask, scale=0.3), atol=1e-5)


def test_masks_over_a_cache():
    """Two new tokens written at slot 3 of a 6-slot cache whose first slot is padding: each sees the real slots at
    or before its own, with a window of 2 only the last two of those; layer_masks stacks one mask per window."""
    cache = {"index": jnp.int32(3), "mask": jnp.array([[False, True, True, False, False, False]])}
    mask, valid = causal_mask(jnp.ones((1, 2), jnp.int32), cache)
    np.testing.assert_array_equal(valid, [[0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(mask[0, 0], [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    windowed, _ = causal_mask(jnp.ones((1, 2), jnp.int32), cache, sliding_window=2)
    np.testing.assert_array_equal(windowed[0, 0], [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]])
    masks, which, stacked_valid = layer_masks(jnp.ones((1, 2), jnp.int32), cache, (2, None, 2))
    np.testing.assert_array_equal(masks, jnp.stack([mask, windowed]))
    np.testing.assert_array_equal(which, [1, 0, 1])
    np.testing.assert_array_equal(stacked_valid, valid)
    np.testing.assert_array_equal(default_positions(jnp.zeros((1, 2), jnp.int32), cache), [[3, 4]])
    moved = next_cache(cache, {}, valid, 2)
    assert int(moved["index"]) == 5 and moved["mask"] is valid and next_cache(None, {}, valid, 2) is None


def long_inputs(length=40, heads=4, kv_heads=2):
    rng = np.random.default_rng(5)
    shapes = [(2, length, heads, 8), *[(2, length, kv_heads, 8)] * 2]
    return tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes)


def long_masks(length=40):
    """(mask, bias) of each family's case over `length` tokens: causal grouped heads with a left-padded row, padded
    keys only ([B, 1, 1, S]: the same for every query), packed rows (segments), a per-head bias with no mask."""
    padded = jnp.ones((2, length), jnp.int32).at[1, :7].set(0)
    segments = jnp.concatenate([jnp.full((2, 15), 1), jnp.full((2, length - 20), 2), jnp.zeros((2, 5), int)], 1)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=(1, 4, length, length)), jnp.float32)
    return {"causal": (causal_mask(padded)[0], None), "keys": (padded.astype(bool)[:, None, None, :], None),
            "packed": (causal_mask(jnp.ones((2, length), jnp.int32), segment_ids=segments)[0], None),
            "bias": (None, bias)}


@pytest.mark.parametrize("case", ["causal", "keys", "packed", "bias"])
def test_chunked_attention_matches_one_call(case):
    """Query blocks of 16 over 40 tokens (the last block padded): the values and the gradients of q, k, v and the
    bias are those of one jax.nn.dot_product_attention call, to float rounding."""
    mask, bias = long_masks()[case]
    q, k, v = long_inputs()

    def loss(fn, q, k, v, bias):
        return (fn(q, k, v, mask=mask, bias=bias) * jnp.cos(jnp.arange(8.0))).sum()

    chunked = functools.partial(chunked_attention, block=16)
    np.testing.assert_allclose(chunked(q, k, v, mask, bias), jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                                                          bias=bias), atol=1e-6)
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    got = jax.grad(functools.partial(loss, chunked), argnums)(q, k, v, bias)
    expected = jax.grad(functools.partial(loss, jax.nn.dot_product_attention), argnums)(q, k, v, bias)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5)


def test_chunked_attention_only_for_long_sequences(monkeypatch):
    """Selected ("chunked"), attention() takes the query blocks from CHUNKED_FROM queries on (one lax.map in the
    graph), one call below; never with attention dropout, whose probabilities take the explicit path; and never
    unless selected."""
    monkeypatch.setattr(attention_module, "_implementation", None)
    monkeypatch.setattr(attention_module, "CHUNKED_FROM", 32)
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", 16)
    mask, _ = long_masks()["causal"]

    def scans(length, **options):
        q, k, v = long_inputs(length)
        graph = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, mask[..., :length, :length], **options))(q, k, v)
        return str(graph).count("scan[")

    assert scans(40) == 0
    monkeypatch.setattr(attention_module, "_implementation", "chunked")
    assert scans(31) == 0 and scans(32) == 1 and scans(40) == 1
    dropout = Attend(0.5).apply({}, *long_inputs(40), mask, None, None, rngs={"dropout": key(2)})
    assert dropout.shape == (2, 40, 4, 8)
    assert str(jax.make_jaxpr(lambda *x: Attend(0.5).apply({}, *x, mask, None, None, rngs={"dropout": key(2)}))(
        *long_inputs(40))).count("scan[") == 0
    q, k, v = long_inputs(40)
    np.testing.assert_allclose(attention(q, k, v, mask), jax.nn.dot_product_attention(q, k, v, mask=mask), atol=1e-6)

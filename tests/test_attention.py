"""The attention and key/value cache every family shares (flaxtrain/models/attention.py): the dropout path against
jax.nn.dot_product_attention in each family's configuration, and the cache layout."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain.models.attention import attention, init_cache, write_cache

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU.
key = functools.partial(jax.random.key, impl="rbg")


class Attend(nn.Module):
    """attention() inside a compact method, as the families call it."""

    rate: float

    @nn.compact
    def __call__(self, q, k, v, mask, bias, scale):
        return attention(q, k, v, mask, bias=bias, scale=scale, dropout_rate=self.rate, deterministic=False)


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

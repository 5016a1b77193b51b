"""models/dropout.py: two 16-bit draws from each 32-bit word, the rate and the expectation exact."""

import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.models.dropout import Dropout, keep_mask, random_words


def test_the_mask_keeps_one_minus_rate_and_its_draws_are_independent():
    mask = np.asarray(keep_mask(jax.random.key(0), 0.1, (64, 257)))  # an odd last axis
    assert mask.shape == (64, 257) and abs(mask.mean() - 0.9) < 0.005
    # The two halves of one word are not tied: neighbours agree as often as independent draws would.
    assert abs((mask[:, 0:256:2] == mask[:, 1:256:2]).mean() - (0.9**2 + 0.1**2)) < 0.01
    assert (keep_mask(jax.random.key(1), 0.1, (64, 257)) != mask).any()


def test_dropout_scales_what_it_keeps_and_passes_through_when_deterministic():
    x = jnp.ones((128, 512))
    apply = lambda rate, deterministic: Dropout(rate).apply(  # noqa: E731
        {}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(2)})
    out = np.asarray(apply(0.1, False))
    kept = out != 0
    np.testing.assert_allclose(out[kept], 65536 / (65536 - round(0.1 * 65536)))
    assert abs(out.mean() - 1) < 0.01
    np.testing.assert_array_equal(apply(0.1, True), x)
    np.testing.assert_array_equal(apply(0.0, False), x)
    assert not np.asarray(apply(1.0, False)).any()
    assert apply(0.1, False).dtype == x.dtype
    assert Dropout(0.1).apply({}, x.astype(jnp.bfloat16), deterministic=False,
                              rngs={"dropout": jax.random.key(2)}).dtype == jnp.bfloat16


def test_random_words_are_jax_random_bits_drawn_flat():
    """The two-dimensional draw gives exactly the bits of `shape` (so masks, and every run's numbers, are as before)."""
    key = jax.random.key(7)
    for shape in [(5,), (3, 4), (2, 3, 5), (2, 3, 4, 5)]:
        assert (random_words(key, shape) == jax.random.bits(key, shape, jnp.uint32)).all(), shape
    jitted = jax.jit(lambda k: random_words(k, (2, 3, 4, 5)))
    assert (jitted(key) == jax.random.bits(key, (2, 3, 4, 5), jnp.uint32)).all()

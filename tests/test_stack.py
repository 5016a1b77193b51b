"""models/stack.py: what the scanned layers keep for the backward pass changes no value."""

import flax.linen as nn
import jax
import numpy as np

from flaxtrain.models.dropout import Dropout
from flaxtrain.models.stack import scan_layers


class Layer(nn.Module):
    """A residual block with an activation and dropout: what the backward pass may keep or recompute."""

    @nn.compact
    def __call__(self, x, scale):
        h = nn.gelu(nn.Dense(16)(nn.LayerNorm()(x)))
        return x + scale * Dropout(0.3)(nn.Dense(4)(h), deterministic=False), None


def test_keeping_only_the_products_gives_the_same_gradients_and_dropout():
    x, scale = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32), np.float32(0.5)
    results = {}
    for keep_only_products in (True, False):
        stack = scan_layers(Layer, 3, False, keep_only_products=keep_only_products)()
        params = stack.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, scale)

        def loss(p):
            return (stack.apply(p, x, scale, rngs={"dropout": jax.random.key(2)})[0] ** 2).sum()

        recomputes = "remat" in str(jax.make_jaxpr(loss)(params))  # the layer under jax.checkpoint
        results[keep_only_products] = (recomputes, *jax.jit(jax.value_and_grad(loss))(params))
    assert results[True][0] == (jax.default_backend() == "cpu") and not results[False][0]
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-6)
    for ours, kept in zip(jax.tree.leaves(results[True][2]), jax.tree.leaves(results[False][2]), strict=True):
        np.testing.assert_allclose(ours, kept, rtol=1e-5, atol=1e-6)

"""models/layers.float32_logits: float32 logits, whose backward is a bfloat16 product under bfloat16 only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain.models.layers import float32_logits

EQUATION = "btd,dv->btv"


def inputs(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 3, 8)).astype(dtype)
    kernel = jax.random.normal(jax.random.key(1), (8, 40))  # float32, as the params are
    return x, kernel


def loss(x, kernel):  # float32 statistics of the float32 logits, as a cross-entropy takes them
    return jax.nn.logsumexp(float32_logits(EQUATION, x, kernel), axis=-1).sum()


def dot_outputs(jaxpr):
    """The output avals of every dot_general in `jaxpr`, nested jaxprs (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.outvars[0].aval)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if isinstance(inner, jax.extend.core.Jaxpr):
                found += dot_outputs(inner)
    return found


def test_bfloat16_logits_are_float32_and_their_backward_a_bfloat16_product():
    x, kernel = inputs(jnp.bfloat16)
    logits = float32_logits(EQUATION, x, kernel)
    want = jnp.einsum(EQUATION, x, kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, want)

    grad_x, grad_kernel = jax.grad(loss, argnums=(0, 1))(x, kernel)
    g = jax.grad(lambda y: jax.nn.logsumexp(y, axis=-1).sum())(want).astype(jnp.bfloat16)
    _, product_vjp = jax.vjp(lambda a, b: jnp.einsum(EQUATION, a, b), x, kernel.astype(jnp.bfloat16))
    want_x, want_kernel = product_vjp(g)
    np.testing.assert_array_equal(grad_x, want_x)
    np.testing.assert_array_equal(grad_kernel, want_kernel.astype(jnp.float32))

    # The matrix's gradient is made by a bfloat16 product: no [D, V] float32 product is left for XLA to keep.
    products = dot_outputs(jax.make_jaxpr(jax.grad(loss, argnums=1))(x, kernel).jaxpr)
    kernel_products = [a for a in products if sorted(a.shape) == sorted(kernel.shape)]  # [D, V] or [V, D]
    assert kernel_products and all(a.dtype == jnp.bfloat16 for a in kernel_products), products


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_other_dtypes_keep_the_float32_product_and_its_gradient(dtype):
    """float16 would underflow the rounded gradient of unlikely words; float32 has nothing to round."""
    x, kernel = inputs(dtype)

    def plain(a, b):
        return jnp.einsum(EQUATION, a, b.astype(dtype), preferred_element_type=jnp.float32)

    np.testing.assert_array_equal(float32_logits(EQUATION, x, kernel), plain(x, kernel))
    grads = jax.grad(loss, argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda a, b: jax.nn.logsumexp(plain(a, b), axis=-1).sum(), argnums=(0, 1))(x, kernel)
    for got, expected in zip(grads, want):
        np.testing.assert_array_equal(got, expected)

"""The layers the families share, each written once: dense and norm layers whose params carry logical axis names
(models/partitioning.py), the tied and untied output projections, and the token-embedding init with a zero pad row.

Params are float32 whatever the computation `dtype`; a family passes its own config values (its init std, its norm
epsilon), so one helper serves configs that name them differently. Module names (`name=`) are the checkpoint's.

Shapes: B batch, T length, D width, V vocabulary.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models.partitioning import EMBED, NORM, VOCAB, dense_inits, named, norm_inits


def dense(std: float, dtype, features: int, name: str | None, axes: tuple = (EMBED, EMBED), *,
          use_bias: bool = True) -> nn.Dense:
    """A Dense layer with a normal(std) kernel [in, out] whose logical axis names are `axes`, and a zero bias."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    **dense_inits(std, axes))


def layer_norm(eps: float, dtype, name: str | None, *, use_bias: bool = True, use_scale: bool = True) -> nn.LayerNorm:
    """torch.nn.LayerNorm over D. Statistics in float32 (flax upcasts); the two-pass variance matches torch on large
    residual streams."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, use_scale=use_scale,
                        use_fast_variance=False, name=name, **norm_inits())


class RMSNorm(nn.Module):
    """x / rms(x) * scale, the statistics in float32 (as transformers), the result in `dtype` (Llama's and T5's)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", named(nn.initializers.ones_init(), NORM), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def float32_logits(equation: str, x, matrix):
    """einsum(equation, x, matrix) in x's dtype with float32 accumulation and output (bfloat16 logits would cost
    the loss precision). Under bfloat16 the backward is a bfloat16 product: the logits' gradient is rounded first,
    so the matrix's gradient [D, V] is made in bfloat16, not float32 (1 GiB a device for Llama's head, alive when
    the backward starts; benchmarks/README.md), as every other layer's is. float16 keeps the float32 gradient:
    rounded to float16, a token's gradient at its unlikely words (probability / tokens in the batch) would be 0."""
    product = _rounded_backward_product if x.dtype == jnp.bfloat16 else _float32_product
    return product(equation, x, matrix.astype(x.dtype))


def _float32_product(equation, x, matrix):
    return jnp.einsum(equation, x, matrix, preferred_element_type=jnp.float32)


_rounded_backward_product = jax.custom_vjp(_float32_product, nondiff_argnums=(0,))


def _rounded_backward_product_fwd(equation, x, matrix):
    return _float32_product(equation, x, matrix), (x, matrix)


def _rounded_backward_product_bwd(equation, saved, g):
    _, product_vjp = jax.vjp(functools.partial(jnp.einsum, equation), *saved)
    return product_vjp(g.astype(saved[0].dtype))


_rounded_backward_product.defvjp(_rounded_backward_product_fwd, _rounded_backward_product_bwd)


def tied_logits(x, embedding):
    """x [B, T, D] -> [B, T, V] float32 = x @ embedding.T (float32_logits)."""
    return float32_logits("btd,vd->btv", x, embedding)


def tied_decoder(module: nn.Module, x, embedding):
    """tied_logits + a `bias` [V], the only param of the decoder, created in `module` (an MLM head's decoder)."""
    bias = module.param("bias", named(nn.initializers.zeros_init(), VOCAB), (embedding.shape[0],), jnp.float32)
    return tied_logits(x, embedding) + bias


class TiedDecoder(nn.Module):
    """A decoder whose weights are the input embeddings and whose only param is its `bias` [V] (ELECTRA's
    `generator_lm_head`, DistilBERT's `vocab_projector`)."""

    @nn.compact
    def __call__(self, x, embedding):
        """x [B, T, E], embedding [V, E] -> logits [B, T, V] float32."""
        return tied_decoder(self, x, embedding)


class LMHead(nn.Module):
    """An untied output projection, `lm_head.weight` (no bias) in transformers."""

    vocab_size: int
    initializer_range: float

    @nn.compact
    def __call__(self, x):
        """x [B, T, D] -> logits [B, T, V] float32."""
        kernel = self.param("kernel", named(nn.initializers.normal(self.initializer_range), EMBED, VOCAB),
                            (x.shape[-1], self.vocab_size), jnp.float32)
        return float32_logits("btd,dv->btv", x, kernel)


def token_embedding_init(std: float, pad_token_id: int):
    """normal(std) with the pad row zeroed, as transformers initialises an nn.Embedding with padding_idx."""
    def init(rng, shape, dtype=jnp.float32):
        return nn.initializers.normal(std)(rng, shape, dtype).at[pad_token_id].set(0)
    return init

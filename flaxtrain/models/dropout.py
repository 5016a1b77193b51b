"""Dropout with half the random-number work of flax's nn.Dropout, used by every family.

JAX's default (partitionable threefry) key hashes a counter per element: 64 random bits for each 32-bit draw, and
nn.Dropout turns those into a float32 uniform to compare with the keep probability. Here each 32-bit draw gives two
16-bit ones, compared as integers. On a CPU the mask of GPT-2's attention probabilities then takes a third of the
time to make, one layer's dropout forward and backward 48 ms instead of 87 ms, and a gpt2-small or t5-small train
step is 2-6% faster. The rate is rounded to a multiple of 1/65536 and the kept values are scaled by that rounded
rate's keep probability, so the expectation is exact.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

STEPS = 1 << 16  # a 16-bit draw is one of these


def keep_mask(rng, rate: float, shape: tuple) -> jax.Array:
    """bool `shape`, each element True with probability 1 - round(rate * 65536) / 65536: half as many 32-bit words
    along the last axis, each split in two."""
    words = jax.random.bits(rng, (*shape[:-1], -(-shape[-1] // 2)), jnp.uint32)
    halves = jnp.stack([words & (STEPS - 1), words >> 16], axis=-1).reshape(*shape[:-1], -1)[..., :shape[-1]]
    return halves >= round(rate * STEPS)


class Dropout(nn.Module):
    """flax.linen.Dropout's interface (rate, deterministic as attribute or argument, the "dropout" rng)."""

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        dropped = round(self.rate * STEPS)
        if dropped >= STEPS:
            return jnp.zeros_like(inputs)
        keep = keep_mask(self.make_rng(self.rng_collection), self.rate, inputs.shape)
        return jnp.where(keep, inputs * (STEPS / (STEPS - dropped)), 0).astype(inputs.dtype)

"""ALiBi (Press et al., "Train short, test long"): no position embeddings, a per-head linear penalty on the distance
to each key added to the attention logits instead. Any family takes `alibi_bias` as the additive `bias` of
models/attention.attention.

As transformers' BLOOM computes it, the bias is slope * (the key's position), not slope * (key - query): within one
query's row the two differ by a constant, which softmax ignores, and the key-only form is [B, N, 1, S], the same for
every query. A key's position counts the real tokens before it (cumsum of the mask - 1), so a padded row attends as
it would unpadded, and the cache's "valid" slots give the same positions during generation. In a packed row (several
examples one after another, attending only within their own) the positions are given instead: each key's within its
example, as the example alone would count them.

Shapes: B batch, N heads, S keys.
"""

import math

import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int) -> np.ndarray:
    """[N] float32: the geometric sequence 2^(-8/n), 2^(-16/n), ... for the largest power of two n <= N heads; for
    a head count that is not a power of two, the remaining heads take every other slope of the sequence for 2n heads
    (the odd powers), as the paper's code and transformers do. The bases are float32 as transformers has them; the
    powers are taken in float64 and rounded once, which is within one float32 ulp of torch's (not always correctly
    rounded) float32 pow, and equal to it for most head counts."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float64(np.float32(2 ** (-(2 ** -(math.log2(closest) - 3)))))
    slopes = base ** np.arange(1, 1 + closest)
    if closest != num_heads:
        extra_base = np.float64(np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3)))))
        remaining = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 1 + 2 * remaining, 2)])
    return slopes.astype(np.float32)


def alibi_bias(valid, num_heads: int, positions=None):
    """valid [B, S] (1/True = a real token in that key slot) -> bias [B, N, 1, S] float32: each head's slope times
    the key's position among the real tokens (0 at padded slots, which the attention mask hides anyway), or times
    `positions` [B, S] where given (a packed row's positions within each example)."""
    if positions is None:
        valid = jnp.asarray(valid).astype(jnp.int32)
        positions = (jnp.cumsum(valid, axis=-1) - 1) * valid  # [B, S]
    positions = jnp.asarray(positions).astype(jnp.float32)
    return jnp.asarray(alibi_slopes(num_heads))[None, :, None, None] * positions[:, None, None, :]

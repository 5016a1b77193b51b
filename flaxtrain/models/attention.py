"""The attention every family uses, and the key/value cache that the models which generate write and read.

`attention` takes heads already projected. Without attention dropout (evaluation, generation, and training with a
rate of 0) it is jax.nn.dot_product_attention, which picks a fused kernel on GPU and TPU; with dropout it is an
explicit float32 softmax, because the probabilities are dropped before they meet the values and
dot_product_attention has no place for that.

The cache, one layout for the decoders (GPT-2, Llama-style) and the encoder-decoders (T5, BART), made by
`init_cache`; buffers are stacked on the layer axis so that the scanned layers read and write their slice:
  "index"  int32 []: the next slot to write. All rows write the same slot.
  "self"   {"key", "value"} [L, B, S, K, H] in the computation dtype: the self-attention keys and values of S slots,
           filled by `write_cache` as the tokens arrive; attention reads all S slots, its mask hiding the unwritten.
  "mask"   [B, S] bool, decoder-only models: True where a slot holds a real token (their prompts are left-padded;
           `flaxtrain.generate.causal_mask` marks the new tokens').
  "cross"  encoder-decoders: {} until the first decode call puts the encoder output's keys and values there,
           {"key", "value"} [L, B, S_enc, K, H]; later calls read them. (An encoder-decoder's decoder input is never
           padded during generation, so it has no "mask".)

Shapes: B batch, T queries (the new tokens), S keys, N query heads, K key/value heads (N a multiple of K), H head
size, L layers.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from flaxtrain.models.dropout import Dropout


def attention(q, k, v, mask=None, *, bias=None, scale: float | None = None, dropout_rate: float = 0.0,
              deterministic: bool = True):
    """softmax(scale * q k^T + bias, where mask) v: q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H]. Each
    key/value head serves N // K consecutive query heads (grouped-query attention when K < N).

    mask: bool broadcastable to [B, N, T, S], True = attend; bias: float broadcastable to [B, N, T, S], added to the
    scaled logits (T5's relative positions); scale None = H**-0.5. With dropout_rate > 0 and not deterministic, the
    attention probabilities go through a Dropout (models/dropout.py) that draws the "dropout" rng: call this inside
    a module's compact method, whose submodule (`Dropout_<n>`) it becomes.
    """
    if deterministic or dropout_rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    # Grouped key/value heads are repeated, so logits and dropout mask are [B, N, T, S] in every family. JAX's random
    # bits follow the flat index: each query head is dropped as a [B, K, N // K, T, S] layout would drop it.
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1]**-0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        # The lowest float32 rather than -inf: a query with no key to attend to gets a uniform softmax, not NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = Dropout(dropout_rate)(jax.nn.softmax(logits, axis=-1), deterministic=False)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def init_cache(num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype: Any, *,
               encoder_decoder: bool = False) -> dict:
    """An empty cache of max_length slots (the layout above): "index" 0, "self" key/value [L, B, S, K, H] zeros,
    and "mask" [B, S] False, or for an encoder-decoder an empty "cross" instead."""
    shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)
    cache = {"index": jnp.zeros((), jnp.int32),
             "self": {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}}
    if encoder_decoder:
        return {**cache, "cross": {}}
    return {**cache, "mask": jnp.zeros((batch_size, max_length), bool)}


def write_cache(layer_cache: dict, k, v, index) -> dict:
    """Writes k, v [B, T, K, H] into one layer's {"key", "value"} [B, S, K, H] at slots index..index + T - 1 (in the
    cache's dtype); returns the updated buffers, which attention then reads whole."""
    start = (0, index, 0, 0)
    return {"key": lax.dynamic_update_slice(layer_cache["key"], k.astype(layer_cache["key"].dtype), start),
            "value": lax.dynamic_update_slice(layer_cache["value"], v.astype(layer_cache["value"].dtype), start)}

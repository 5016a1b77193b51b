"""The attention every family uses, the key/value cache that the models which generate write and read, and the
masks and positions of a decoder's new tokens over that cache (`causal_mask`, `layer_masks`, `default_positions`,
`next_cache`), which the decoder families call and flaxtrain/generate.py relies on.

Packed rows (training and evaluation only, never with a cache): `segment_ids` [B, T] int numbers the examples that
one row holds one after another (1, 2, 3, ... per example, 0 on padding). The masks then keep each query to the keys
of its own example, and `segment_positions` restarts the positions at 0 in each, so that every example computes what
it would alone in its own row. Built here once, every family (sliding windows included) gets it.

`attention` takes heads already projected. Without attention dropout (evaluation, generation, and training with a
rate of 0) and without a soft cap it is jax.nn.dot_product_attention; otherwise it is an explicit float32 softmax,
because the probabilities are dropped before they meet the values, and the logits capped before the softmax, and
dot_product_attention has no place for either.

Which kernel attention runs is one process-wide setting, FLAXTRAIN_ATTENTION (or `select_implementation` in code):
unset, JAX chooses (today XLA's attention on every platform); "xla" names that; "chunked" is XLA's attention in
query blocks for long sequences (at least CHUNKED_FROM queries): the queries go through dot_product_attention
QUERY_BLOCK at a time (`chunked_attention`, lax.map under jax.checkpoint), so that one block's float32 scores
[B, N, QUERY_BLOCK, S] are alive, not all T rows', in the forward and in the backward pass; each query's softmax is
over all its keys either way, the same numbers as one call to float rounding. It saves memory (Llama-2-70B at 2048
tokens: 1 GiB of scores a row; see benchmarks/README.md's memory plans) and is not the default, as its speed is not
measured on an accelerator yet. "cudnn" asks for cuDNN's fused flash attention on an NVIDIA GPU. cuDNN takes only
bfloat16/float16 heads of a size that is a multiple of 8 (up to 128, 256 from Hopper on) and, with a mask or bias
while training, even lengths. The dense mask reaches cuDNN as an additive bias [B, 1, T, S]: it cannot skip masked
blocks the way is_causal would. "splash" asks for the Pallas splash attention kernel on a TPU (models/splash.py),
which reads the mask as its structure: the families whose self-attention says it (`Structure`: GPT-2, the
Llama-style decoders, Phi-3, Gemma, DistilBERT and BERT's self-attention, which RoBERTa, ELECTRA and ALBERT share)
get it; the rest, and what the kernel cannot take, run XLA's.
A selected kernel that does not run (no such device, an argument it refuses, attention dropout) says why once,
logged and kept in `fallbacks`.

The cache, one layout for the decoders (GPT-2, Llama-style) and the encoder-decoders (T5, BART), made by
`init_cache`; buffers are stacked on the layer axis so that the scanned layers read and write their slice:
  "index"  int32 []: the next slot to write. All rows write the same slot.
  "self"   {"key", "value"} [L, B, S, K, H] in the computation dtype: the self-attention keys and values of S slots,
           filled by `write_cache` as the tokens arrive; attention reads all S slots, its mask hiding the unwritten.
  "mask"   [B, S] bool, decoder-only models: True where a slot holds a real token (their prompts are left-padded;
           `causal_mask` marks the new tokens').
  "cross"  encoder-decoders: {} until the first decode call puts the encoder output's keys and values there,
           {"key", "value"} [L, B, S_enc, K, H]; later calls read them. (An encoder-decoder's decoder input is never
           padded during generation, so it has no "mask".)

Shapes: B batch, T queries (the new tokens), S keys, N query heads, K key/value heads (N a multiple of K), H head
size, L layers.
"""

import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flaxtrain.models import splash
from flaxtrain.models.dropout import Dropout

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "splash")
ENVIRONMENT = "FLAXTRAIN_ATTENTION"
# Read once, checked when attention first runs: a bad value is then a refusal of the run, not an import error.
_implementation = os.environ.get(ENVIRONMENT) or None
CHUNKED_FROM = 1024  # "chunked": shorter sequences take one call (their scores are small, one call is faster)
QUERY_BLOCK = 512
fallbacks: list[str] = []  # why calls that asked for cuDNN or splash ran XLA's attention, each reason once, in order


class Structure(NamedTuple):
    """A self-attention mask said as its structure, for a kernel that skips masked blocks (splash) rather than
    reading [B, 1, T, T] booleans: a query sees the keys of its own segment, before it if causal, and within the
    sliding window if one (causal masks only). With several windows (layers that differ, one scan), `which` picks
    the layer's."""
    segments: jax.Array  # [B, T] int: `kernel_segments`
    causal: bool = True
    windows: tuple[int | None, ...] = (None,)
    which: Any = 0


def kernel_segments(attention_mask: jax.Array, cache: dict | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array | None:
    """A Structure's segments [B, T] int32: the packed rows' segment_ids, else the attention_mask (1 = token, 0 =
    padding, itself a segment); None with a cache, where the kernel does not run."""
    if cache is not None:
        return None
    return (attention_mask if segment_ids is None else segment_ids).astype(jnp.int32)


def causal_structure(segments: jax.Array | None, windows: tuple[int | None, ...] = (None,),
                     which: Any = 0) -> Structure | None:
    """The Structure of a decoder's causal mask over `kernel_segments` (None without them: a cache)."""
    return None if segments is None else Structure(segments, True, windows, which)


def padding_structure(mask: jax.Array) -> Structure:
    """The Structure of an encoder's self-attention mask [B, 1, 1, T] (True on the tokens, the keys every query
    sees): not causal, the tokens one segment and the padding another."""
    return Structure(mask[:, 0, 0].astype(jnp.int32), causal=False)


def select_implementation(name: str | None) -> None:
    """The kernel of every later trace of `attention` (steps already compiled keep theirs): None (JAX's choice),
    "xla", "chunked", "cudnn" or "splash"; see the module's docstring."""
    global _implementation
    _implementation = name
    selected_implementation()


def selected_implementation() -> str | None:
    if _implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"{ENVIRONMENT}={_implementation}: expected one of {', '.join(IMPLEMENTATIONS)} "
                         "(or unset, JAX's choice)")
    return _implementation


def attention(q, k, v, mask=None, *, bias=None, scale: float | None = None, softcap: float | None = None,
              dropout_rate: float = 0.0, deterministic: bool = True, structure: Structure | None = None):
    """softmax(cap(scale * q k^T) + bias, where mask) v: q [B, T, N, H], k and v [B, S, K, H] -> [B, T, N, H]. Each
    key/value head serves N // K consecutive query heads (grouped-query attention when K < N).

    mask: bool broadcastable to [B, N, T, S], True = attend; bias: float broadcastable to [B, N, T, S], added to the
    scaled logits (T5's relative positions); scale None = H**-0.5; softcap: None, or c for cap(x) = c * tanh(x / c)
    (gemma2's attn_logit_softcapping). With dropout_rate > 0 and not deterministic, the attention probabilities go
    through a Dropout (models/dropout.py) that draws the "dropout" rng: call this inside a module's compact method,
    whose submodule (`Dropout_<n>`) it becomes. structure: the same mask as a `Structure`, from self-attention that
    can say it, for FLAXTRAIN_ATTENTION=splash.
    """
    dropout = not deterministic and dropout_rate != 0.0
    implementation = selected_implementation()
    if implementation in ("cudnn", "splash") and dropout:
        _fell_back(f"attention dropout ({dropout_rate}) needs the explicit softmax, which no fused kernel runs")
    # Rows shorter than one of splash's blocks (init's, a decoding step's) take XLA's attention without a word.
    if implementation == "splash" and not dropout and q.shape[1] >= splash.LANES:
        reason = splash.refusal(q, k, bias, structure)
        if reason is None:
            return splash.splash_attention(q, k, v, structure, scale, softcap)
        _fell_back(reason)
    if implementation == "cudnn" and softcap is not None and not dropout:
        _fell_back("a soft cap over the logits, for which cuDNN's attention has no place")
    if not dropout and softcap is None:
        if implementation == "cudnn":
            return _cudnn_attention(q, k, v, mask, bias, scale)
        if implementation == "chunked":
            if q.shape[1] >= CHUNKED_FROM:
                return chunked_attention(q, k, v, mask, bias, scale, None, QUERY_BLOCK)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                            implementation="xla" if implementation == "xla" else None)
    # Grouped key/value heads are repeated, so logits and dropout mask are [B, N, T, S] in every family. JAX's random
    # bits follow the flat index: each query head is dropped as a [B, K, N // K, T, S] layout would drop it.
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * (q.shape[-1]**-0.5 if scale is None else scale)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        # The lowest float32 rather than -inf: a query with no key to attend to gets a uniform softmax, not NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout:
        probs = Dropout(dropout_rate)(probs, deterministic=False)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def chunked_attention(q, k, v, mask=None, bias=None, scale: float | None = None, implementation: str | None = None,
                      block: int = QUERY_BLOCK):
    """jax.nn.dot_product_attention over QUERY_BLOCK queries at a time (shapes and arguments as `attention`'s): a
    lax.map over the blocks, each rematerialised in the backward pass, so that only one block's scores are alive.
    T need not be a multiple of the block: the last block is padded with queries that see no key, then cut off."""
    batch, length, heads, size = q.shape
    blocks = -(-length // block)
    padding = blocks * block - length

    def by_block(x):  # [..., T, S] (or [..., 1, S]) -> [blocks, ..., block, S] (or None: the same for every block)
        if x is None or x.shape[-2] == 1:
            return None
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, padding), (0, 0)])
        x = x.reshape(*x.shape[:-2], blocks, block, x.shape[-1])
        return jnp.moveaxis(x, -3, 0)

    def full(x):  # mask and bias broadcastable to [B, N, T, S]: rank 4, so their query axis is -2
        return None if x is None else x.reshape((1,) * (4 - x.ndim) + x.shape)

    mask, bias = full(mask), full(bias)
    q_blocks = jnp.pad(q, ((0, 0), (0, padding), (0, 0), (0, 0))).reshape(batch, blocks, block, heads, size)
    xs = (jnp.moveaxis(q_blocks, 1, 0), by_block(mask), by_block(bias))

    @jax.checkpoint
    def one_block(x):
        q_block, mask_block, bias_block = x
        return jax.nn.dot_product_attention(
            q_block, k, v, scale=scale, implementation=implementation,
            mask=mask if mask_block is None else mask_block, bias=bias if bias_block is None else bias_block)

    out = lax.map(one_block, xs)  # [blocks, B, block, N, H]
    return jnp.moveaxis(out, 0, 1).reshape(batch, blocks * block, heads, size)[:, :length]


def cudnn_refusal(q, k, v, mask=None, bias=None) -> str | None:
    """Why cuDNN's flash attention cannot take these arguments while training (None: it can), by the rules jax
    checks for implementation="cudnn" (check_layout and check_is_flash_attention of jax/_src/cudnn/
    fused_attention_stablehlo.py). Checked here because jax checks the backward pass's rule only when it
    differentiates, which under nn.scan is after attention() has returned, too late to fall back."""
    if jax.default_backend() != "gpu":
        return f"no NVIDIA GPU (the backend is {jax.default_backend()})"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)):
        return f"cuDNN takes bfloat16 or float16 heads, these are {q.dtype} (train with --dtype bfloat16)"
    compute_capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    largest = 256 if tuple(map(int, compute_capability.split("."))) >= (9, 0) else 128
    if q.shape[-1] % 8 or q.shape[-1] > largest:
        return f"head size {q.shape[-1]}: cuDNN takes multiples of 8 up to {largest} on this GPU"
    if (mask is not None or bias is not None) and (q.shape[1] % 2 or k.shape[1] % 2):
        return f"a mask or bias over an odd length ({q.shape[1]} queries, {k.shape[1]} keys): cuDNN needs even ones"
    return None


def _cudnn_attention(q, k, v, mask, bias, scale):
    """jax.nn.dot_product_attention(implementation="cudnn"), or XLA's where cuDNN refuses (`cudnn_refusal`, and
    whatever jax refuses while tracing: its own checks raise before anything runs)."""
    reason = cudnn_refusal(q, k, v, mask, bias)
    if reason is None:
        # cuDNN wants the mask and bias over every query and key ([., ., T, S], its heads and batch may broadcast)
        # and a bias in the heads' dtype, to which jax adds the mask (a large negative number where False).
        full = lambda x: jnp.broadcast_to(x, (*x.shape[:-2], q.shape[1], k.shape[1]))  # noqa: E731
        try:
            return jax.nn.dot_product_attention(
                q, k, v, bias=None if bias is None else full(bias).astype(q.dtype),
                mask=None if mask is None else full(mask), scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as error:
            reason = f"jax refused: {str(error).splitlines()[0]}"
    _fell_back(reason)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale)


def _fell_back(reason: str) -> None:
    """Says once why a call that asked for a fused kernel runs XLA's attention (the explicit softmax, or
    dot_product_attention) instead."""
    if reason not in fallbacks:
        fallbacks.append(reason)
        logging.getLogger(__name__).warning("%s=%s: XLA's attention instead, %s", ENVIRONMENT, _implementation, reason)


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


def causal_mask(attention_mask: jax.Array, cache: dict | None = None, sliding_window: int | None = None,
                segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Which keys each new token attends to.

    attention_mask [B, T] (1 = token, 0 = pad) of the T new tokens -> (mask [B, 1, T, S] bool, valid [B, S] bool).
    Without a cache the keys are the new tokens (S = T); with one they are the cache's S slots, the new tokens
    being written at cache["index"], and `valid` is the cache's mask with theirs written in. A query sees the real
    keys at or before its slot and, with a sliding window W, only the last W of those slots (itself included), as
    transformers counts it (slots, not positions, so padding inside the window counts).

    segment_ids [B, T] (packed rows, see above; no cache): besides, a query sees only the keys of its own example, and
    no key on padding (0). An example's tokens are consecutive slots, so its window is the one it has alone.
    """
    if segment_ids is not None and cache is not None:
        raise ValueError("segment_ids (packed rows) are for training and evaluation; they cannot be used with a cache")
    valid = attention_mask.astype(bool)
    start = 0
    if cache is not None:
        start = cache["index"]
        valid = lax.dynamic_update_slice(cache["mask"], valid, (0, start))
    query = start + jnp.arange(attention_mask.shape[1])[:, None]  # [T, 1] slots of the new tokens
    key = jnp.arange(valid.shape[1])[None, :]  # [1, S]
    allowed = key <= query
    if sliding_window is not None:
        allowed &= key > query - sliding_window
    mask = valid[:, None, None, :] & allowed[None, None]
    if segment_ids is not None:
        mask &= same_segment(segment_ids)[:, None]
    return mask, valid


def same_segment(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> [B, T, T] bool: whether query t and key s are tokens of the same example, the key not
    padding (segment 0; a padding query then sees no key, and attention gives it a uniform softmax, not NaN)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """segment_ids [B, T] -> [B, T] int32: each token's index within its example (within its run of equal ids, so a
    padding run counts from 0 too), what a packed row's position_ids hold."""
    slots = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    first = lax.cummax(jnp.where(starts, slots, 0), axis=1)  # [B, T] the slot where each token's example starts
    return (slots - first).astype(jnp.int32)


def default_positions(input_ids: jax.Array, cache: dict | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
    """transformers' default position_ids [B, T] of the new tokens input_ids [B, T]: consecutive from the first (from
    cache["index"] with a cache, else 0), padding ignored. (flaxtrain.generate passes positions counted from the
    mask instead.) With segment_ids (packed rows), restarting at 0 in each example: `segment_positions`."""
    if segment_ids is not None:
        return segment_positions(segment_ids)
    start = 0 if cache is None else cache["index"]
    return jnp.broadcast_to(start + jnp.arange(input_ids.shape[1]), input_ids.shape)


def next_cache(cache: dict | None, self_cache: dict, valid: jax.Array, length: int) -> dict | None:
    """A decoder's cache after `length` new tokens (None without one): "self" the scanned layers' updated
    key/value buffers, "mask" `valid` from causal_mask or layer_masks, "index" moved past the new tokens."""
    return None if cache is None else {"index": cache["index"] + length, "self": self_cache, "mask": valid}


def layer_masks(attention_mask: jax.Array, cache: dict | None, layer_windows: tuple[int | None, ...],
                segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The masks of layers with different sliding windows (None: full attention), for one nn.scan over them all:
    (masks [M, B, 1, T, S] bool, one per distinct window, which [L] int32: each layer's index into masks, valid
    [B, S] bool as causal_mask's). segment_ids [B, T]: packed rows, as causal_mask."""
    windows = distinct_windows(layer_windows)
    masks = [causal_mask(attention_mask, cache, w, segment_ids) for w in windows]
    which = jnp.array([windows.index(w) for w in layer_windows], jnp.int32)
    return jnp.stack([m for m, _ in masks]), which, masks[0][1]


def distinct_windows(layer_windows: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """The distinct sliding windows of the layers (None first), in the order of layer_masks' masks."""
    return tuple(sorted(set(layer_windows), key=lambda w: w or 0))

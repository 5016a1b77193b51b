"""Rotary position embeddings (RoPE) and the scaled variants of transformers 5 (`modeling_rope_utils.py`).

A family file uses three things:

    from flaxtrain.models.rope import apply_rope, rope_parameters, rope_tables

    # in the config dataclass: a hashable copy of the Hugging Face config's (standardized) `rope_parameters`
    rope: tuple = ()                       # from_hf: values["rope"] = rope_parameters(hf_config)
    # in the body, once per forward (every layer shares the tables):
    cos, sin = rope_tables(position_ids, head_dim, cfg.rope, cfg.max_position_embeddings, dtype)  # [B, T, R]
    # in attention, on queries and keys [B, T, N, H]:
    q = apply_rope(q, cos, sin)

R is the rotary dimension: int(H * partial_rotary_factor) rounded up to even (H without the factor); apply_rope
rotates the first R features of each head and passes the rest through (Phi-3, GPT-NeoX, ...). The layout is
transformers' `rotate_half` one: frequency i pairs features i and i + R/2.

rope_type (the dict's "rope_type", or the old "type"): "default"; "linear" (frequencies / factor); "dynamic" (NTK:
the base grows with the sequence once it passes max_position_embeddings); "yarn"; "llama3" (Llama 3.1+: low
frequencies / factor, high ones kept, a smooth ramp between); "longrope" (Phi-3: per-frequency short_factor, or
long_factor once the sequence passes original_max_position_embeddings). yarn and longrope also scale cos/sin by an
"attention factor". "dynamic" and "longrope" depend on the sequence length seen, which transformers takes as
max(position_ids) + 1 of each forward call (of the cached step during generation): so do we, inside jit, from the
positions. transformers keeps dynamic's grown base across calls (state on the module); a fresh model, and one
generate() call, with its growing positions, see what this stateless version computes.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def rope_parameters(hf_config: Any, supported: tuple[str, ...] = ROPE_TYPES) -> tuple[tuple[str, Any], ...]:
    """A transformers config's RoPE parameters as sorted (key, value) pairs (hashable, for frozen config dataclasses;
    lists become tuples), with "rope_type" and "rope_theta" always present and "partial_rotary_factor" when the config
    has one. Raises ValueError naming the rope_type when it is not in `supported`.

    Reads `rope_parameters` (transformers 5 has already moved `rope_scaling`, `rope_theta`, `partial_rotary_factor`
    and Phi-3's `original_max_position_embeddings` into it), else the older top-level fields.
    """
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"  # "type": the old name
    rope.pop("type", None)
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    if getattr(hf_config, "partial_rotary_factor", None) is not None:
        rope.setdefault("partial_rotary_factor", hf_config.partial_rotary_factor)
    if rope["rope_type"] in ("yarn", "llama3", "longrope"):  # as transformers' standardize_rope_params
        rope.setdefault("original_max_position_embeddings",
                        getattr(hf_config, "original_max_position_embeddings", None)
                        or getattr(hf_config, "max_position_embeddings", None))
    if rope["rope_type"] not in supported:
        raise ValueError(f"{getattr(hf_config, 'model_type', 'this')} config has rope_type {rope['rope_type']!r} "
                         f"(rope_parameters {rope}); supported: {list(supported)}")
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))


def rotary_dim(head_dim: int, rope: Mapping | tuple) -> int:
    """R: the number of features of each head that RoPE rotates (even: the frequencies come in pairs)."""
    dim = int(head_dim * dict(rope).get("partial_rotary_factor", 1.0))
    return dim + dim % 2


def _base_exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.float64) / dim  # [R/2]: 2i / dim


def inverse_frequencies(rope: Mapping | tuple, head_dim: int, max_position_embeddings: int, seq_len=None):
    """(inv_freq [R/2] float32, attention factor: a Python float) of transformers' ROPE_INIT_FUNCTIONS.

    seq_len: int32 scalar (may be traced), the length seen (max position + 1); only "dynamic" and "longrope" read
    it, None being transformers' value at init (no growth, short factors). Static parts are computed in float64 and
    rounded once; dynamic's grown base in float32, as torch does it.
    """
    p = dict(rope)
    rope_type, base = p.get("rope_type", "default"), float(p.get("rope_theta", 10000.0))
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    exponents = _base_exponents(dim)
    inv_freq = 1.0 / base ** exponents
    omp = p.get("original_max_position_embeddings") or max_position_embeddings
    factor = p.get("factor")
    scaling = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / factor
    elif rope_type == "dynamic":
        original = jnp.asarray(inv_freq, jnp.float32)
        if seq_len is None:
            return original, scaling
        # The base grows with the length past max_position_embeddings; below it transformers keeps the original.
        length = jnp.maximum(seq_len, max_position_embeddings).astype(jnp.float32)
        grown = base * (factor * length / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
        grown_inv = 1.0 / grown ** jnp.asarray(exponents, jnp.float32)
        return jnp.where(seq_len > max_position_embeddings, grown_inv, original), scaling
    elif rope_type == "llama3":
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > omp / low, inv_freq / factor, inv_freq)
        smooth = (omp / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= omp / high) & (wavelen <= omp / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        factor = factor or max_position_embeddings / omp
        scaling = _yarn_attention_factor(p, factor)
        # Frequencies that rotate more than beta_fast times over omp positions are kept (extrapolated), those under
        # beta_slow interpolated (divided by factor), a linear ramp between.
        def correction_dim(rotations):
            return dim * math.log(omp / (rotations * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    elif rope_type == "longrope":
        # Phi-3 leaves `factor` out: the ratio of the context lengths stands in for it.
        factor = factor or max_position_embeddings / omp
        scaling = p.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omp))
        powers = base ** exponents
        short = jnp.asarray(1.0 / (np.asarray(p["short_factor"], np.float64) * powers), jnp.float32)
        if seq_len is None:
            return short, scaling
        long = jnp.asarray(1.0 / (np.asarray(p["long_factor"], np.float64) * powers), jnp.float32)
        return jnp.where(seq_len > omp, long, short), scaling
    else:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    return jnp.asarray(inv_freq, jnp.float32), scaling


def _yarn_attention_factor(p: dict, factor: float) -> float:
    if p.get("attention_factor") is not None:
        return p["attention_factor"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if p.get("mscale") and p.get("mscale_all_dim"):
        return mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
    return mscale(factor)


def rope_tables(position_ids, head_dim: int, rope: Mapping | tuple, max_position_embeddings: int, dtype):
    """position_ids [B, T] ints -> (cos, sin) [B, T, R] in `dtype`, computed in float32 and scaled by the attention
    factor, the frequency table repeated for the two halves that `rotate_half` pairs (transformers' layout).

    `rope`: the RoPE parameters (a dict, or `rope_parameters`' pairs); `max_position_embeddings` the config's. The
    length that "dynamic" and "longrope" react to is max(position_ids) + 1 over the whole batch, as transformers.
    """
    seq_len = jnp.max(position_ids) + 1
    inv_freq, scaling = inverse_frequencies(rope, head_dim, max_position_embeddings, seq_len)
    angles = position_ids.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scaling).astype(dtype), (jnp.sin(angles) * scaling).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, N, H], cos/sin [B, T, R] with R <= H -> x with its first R features of each head rotated,
    x * cos + rotate_half(x) * sin, the other H - R passed through (partial rotary)."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    rot = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return rot if r == x.shape[-1] else jnp.concatenate([rot, rest], axis=-1)

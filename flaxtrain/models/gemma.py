"""Gemma decoders (transformers' `gemma`, `gemma2` and the text model of Gemma 3, `gemma3_text`) as Flax linen modules.

Llama's architecture (models/llama.py: RoPE, grouped-query attention, a gated MLP) with Gemma's changes:
- the embeddings are scaled by sqrt(hidden_size), rounded to the computation dtype as transformers rounds them (a
  bf16 model multiplies by 55.5, not 55.43, for a width of 3072);
- RMSNorm multiplies by (1 + weight) in float32 and casts after that (Llama casts first);
- a GELU-tanh gated MLP, head_dim independent of hidden_size, and the LM head tied to the embeddings (the
  checkpoints' setting; an untied config gets its own `lm_head`, as in transformers).
gemma2 adds: attention scale query_pre_attn_scalar**-0.5; tanh soft-capping of the attention logits
(attn_logit_softcapping) and of the final logits (final_logit_softcapping); norms after attention and after the
MLP as well as before them ("sandwich" norms: post_attention_layernorm becomes the post-attention one and
pre_feedforward_layernorm the pre-MLP one); sliding-window layers as `layer_types` says (every other layer).
gemma3_text adds to gemma2: RMSNorms on the queries and keys per head (q_norm, k_norm); the sliding-window (local)
layers use RoPE base rope_local_base_freq and the full (global) ones rope_theta with that RoPE's scaling (gemma-3-4b
and larger: linear, factor 8; any rope_type of models/rope.py). Its modeling code applies no
attention soft-capping (it never passes attn_logit_softcapping on), so neither do we.

Param names copy the PyTorch keys: `model/layers/self_attn/q_norm/scale` [L, H] is
`model.layers.{i}.self_attn.q_norm.weight`.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D hidden_size, N heads, K key/value heads,
H head_dim, F intermediate_size, V vocab_size, L layers.
"""

import dataclasses
import functools
import math
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models.attention import (attention, causal_mask, causal_structure, default_positions, init_cache,
                                        kernel_segments, next_cache, write_cache)
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import lm_logits
from flaxtrain.models.layers import dense
from flaxtrain.models.llama import LlamaMLP, init_params
from flaxtrain.models.partitioning import EMBED, HEADS, KV, NORM, embedding_init, named
from flaxtrain.models.rope import ROPE_TYPES, apply_rope, rope_parameters, rope_tables
from flaxtrain.models.stack import scan_layers

_HF_ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                     "gemma3_text": "Gemma3ForCausalLM"}
# A layer's kind: its index in the stacked masks and RoPE tables the scanned layers pick from.
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The fields of a Hugging Face Gemma/Gemma2/Gemma3-text `config.json` that the model uses (defaults: gemma-7b).

    What each model type's modeling code ignores is set off by `from_hf`: gemma has no soft-capping, sandwich norms
    or sliding window; gemma3_text no attention soft-capping. `layer_types` None: every layer "full_attention".

    RoPE (any rope_type of models/rope.py): `rope_parameters` holds the full-attention layers' parameters (every
    layer's but gemma3_text's sliding ones) as sorted (key, value) pairs, `rope_local_parameters` gemma3_text's
    sliding-window layers' (transformers 5 keeps both in one `rope_parameters` dict keyed by layer type); a
    `rope_theta` in them wins over the fields rope_theta and rope_local_base_freq, kept for configs built by hand.
    See `rope`.
    """

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"  # gemma's config calls it hidden_act
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: tuple[tuple[str, Any], ...] = ()
    rope_local_base_freq: float | None = None  # None: the sliding-window layers' RoPE is the full layers'
    rope_local_parameters: tuple[tuple[str, Any], ...] = ()
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float | None = None  # the attention scale is its inverse square root; None: head_dim
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    model_type: str = "gemma"

    def __post_init__(self):
        if self.model_type not in _HF_ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not a Gemma type; expected one of "
                             f"{list(_HF_ARCHITECTURES)}")
        if self.hidden_activation not in ACT_FNS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} key/value heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(_LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {_LAYER_TYPES} for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        for rope in (self.rope, self.local_rope):
            if rope["rope_type"] not in ROPE_TYPES:
                raise ValueError(f"rope_type {rope['rope_type']!r} is not supported; supported: {list(ROPE_TYPES)}")
            if rope.get("partial_rotary_factor", 1.0) != 1.0:  # transformers' Gemma rotates whole heads only
                raise ValueError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported by "
                                 f"{self.model_type}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GemmaConfig":
        """From a transformers `GemmaConfig`/`Gemma2Config`/`Gemma3TextConfig`; raises ValueError on what this
        model lacks (a rope_type not in models/rope.py, partial rotary, bidirectional attention)."""
        model_type = hf_config.model_type
        if getattr(hf_config, "use_bidirectional_attention", None):
            raise ValueError(f"{model_type} config has use_bidirectional_attention=True; only causal attention is "
                             "supported")
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        if model_type == "gemma3_text":  # {layer type: its RoPE parameters}, standardized by rope_parameters
            per_type = dict(hf_config.rope_parameters or {})
            full, local = (rope_parameters(types.SimpleNamespace(
                model_type=f"{model_type} {layer_type}", rope_parameters=per_type.get(layer_type),
                max_position_embeddings=hf_config.max_position_embeddings))
                for layer_type in ("full_attention", "sliding_attention"))
            values.update(rope_local_parameters=local, rope_local_base_freq=dict(local)["rope_theta"])
        else:
            full = rope_parameters(hf_config)
            values.update(rope_local_parameters=(), rope_local_base_freq=None)
        values.update(rope_parameters=full, rope_theta=dict(full)["rope_theta"])
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        # Only what transformers' modeling code of each type reads: a field it ignores is ignored here too.
        if model_type == "gemma":
            values.update(hidden_activation=hf_config.hidden_act, query_pre_attn_scalar=None, sliding_window=None,
                          layer_types=None, attn_logit_softcapping=None, final_logit_softcapping=None)
        elif model_type == "gemma3_text":
            values["attn_logit_softcapping"] = None
        if values["layer_types"] is not None:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)

    @property
    def rope(self) -> dict:
        """The full-attention layers' RoPE parameters for models/rope.py: rope_type, rope_theta, the scaling's."""
        return {"rope_type": "default", "rope_theta": self.rope_theta, **dict(self.rope_parameters)}

    @property
    def local_rope(self) -> dict:
        """The sliding-window layers' RoPE parameters: gemma3_text's own, else the full layers'."""
        if self.rope_local_base_freq is None and not self.rope_local_parameters:
            return self.rope
        return {"rope_type": "default", "rope_theta": self.rope_local_base_freq or self.rope_theta,
                **dict(self.rope_local_parameters)}

    @property
    def sandwich_norms(self) -> bool:
        """Norms after attention and the MLP too (gemma2, gemma3_text)."""
        return self.model_type != "gemma"

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def kinds(self) -> tuple[int, ...]:
        """Each layer's index in _LAYER_TYPES."""
        return tuple(_LAYER_TYPES.index(t) for t in self.layer_types or ("full_attention",) * self.num_hidden_layers)

    # What LlamaMLP reads.
    @property
    def hidden_act(self) -> str:
        return self.hidden_activation

    mlp_bias = False


def max_positions(config: GemmaConfig) -> int:
    """The sequence length the model was configured (and trained) for; RoPE itself sets no hard limit."""
    return config.max_position_embeddings


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + scale) in float32, then cast to `dtype` (Gemma casts after the product, Llama before);
    `scale` starts at 0. `axis` is the logical name of the normalised dimension (NORM for D, KV for a head)."""

    eps: float
    dtype: Any = jnp.float32
    axis: str = NORM

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", named(nn.initializers.zeros_init(), self.axis), (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + scale)).astype(self.dtype)


class GemmaAttention(nn.Module):
    config: GemmaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, structure, cos, sin, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S] and its structure (None with a cache), cos/sin [B, T, H], layer_cache None
        or {"key", "value"} [B, S, K, H] -> ([B, T, D], this layer's updated cache or None)."""
        cfg = self.config
        n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def project(heads, name, norm=None):  # -> [B, T, heads, H]
            layer = dense(cfg.initializer_range, self.dtype, heads * h, name, (EMBED, HEADS),
                          use_bias=cfg.attention_bias)
            out = layer(x).reshape(*x.shape[:2], heads, h)
            if norm and cfg.qk_norm:  # gemma3_text: an RMSNorm over each head, before RoPE
                out = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype, KV, name=norm)(out)
            return out

        q = apply_rope(project(n, "q_proj", "q_norm"), cos, sin)
        key = apply_rope(project(k, "k_proj", "k_norm"), cos, sin)
        value = project(k, "v_proj")
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, key, value, index)
            key, value = layer_cache["key"], layer_cache["value"]
        out = attention(q, key, value, mask, scale=(cfg.query_pre_attn_scalar or h)**-0.5,
                        softcap=cfg.attn_logit_softcapping, dropout_rate=cfg.attention_dropout,
                        deterministic=deterministic, structure=structure)
        out = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "o_proj", (HEADS, EMBED),
                    use_bias=cfg.attention_bias)(
            out.reshape(*x.shape[:2], n * h))
        return out, layer_cache


class GemmaDecoderLayer(nn.Module):
    """One block. `masks` [2, B, 1, T, S] and `cos`/`sin` [2, B, T, H] hold the full and the sliding-window
    layers' (in _LAYER_TYPES order); `kind` (scanned, [L]) picks this layer's, so that both share one scan.
    `segments` [B, T] (None with a cache) are the masks' segments, attention.kernel_segments."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, masks, segments, cos, sin, index, kind, layer_cache):
        cfg = self.config
        norm = functools.partial(GemmaRMSNorm, cfg.rms_norm_eps, self.dtype)
        structure = causal_structure(segments, (None, cfg.sliding_window), kind)  # in _LAYER_TYPES order
        h, layer_cache = GemmaAttention(cfg, self.dtype, name="self_attn")(
            norm(name="input_layernorm")(x), masks[kind], structure, cos[kind], sin[kind], index, layer_cache,
            self.deterministic)
        mlp = LlamaMLP(cfg, self.dtype, name="mlp")
        if not cfg.sandwich_norms:  # gemma: Llama's block
            x = x + h
            return x + mlp(norm(name="post_attention_layernorm")(x)), layer_cache
        x = x + norm(name="post_attention_layernorm")(h)
        h = mlp(norm(name="pre_feedforward_layernorm")(x))
        return x + norm(name="post_feedforward_layernorm")(h), layer_cache


class GemmaModel(nn.Module):
    """The body: `embed_tokens`, the scanned `layers`, the final `norm`. `deterministic` is an attribute so that
    setup can build the scanned layers."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                     embedding_init=embedding_init(cfg.initializer_range))
        self.layers = scan_layers(GemmaDecoderLayer, cfg.num_hidden_layers, self.gradient_checkpointing,
                                  in_axes=(nn.broadcast,) * 5 + (0, 0))(cfg, self.dtype, self.deterministic)
        self.norm = GemmaRMSNorm(cfg.rms_norm_eps, self.dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See GemmaForCausalLM."""
        cfg = self.config
        start = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache, segment_ids)
        # The scale is a float32 buffer that transformers casts to the weights' dtype before multiplying.
        x = self.embed_tokens(input_ids) * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        full, valid = causal_mask(attention_mask, cache, segment_ids=segment_ids)
        sliding = (full if cfg.sliding_window is None
                   else causal_mask(attention_mask, cache, cfg.sliding_window, segment_ids)[0])
        tables = [rope_tables(position_ids, cfg.head_dim, rope, cfg.max_position_embeddings, self.dtype)
                  for rope in (cfg.rope, cfg.local_rope)]  # in _LAYER_TYPES order
        segments = kernel_segments(attention_mask, cache, segment_ids)
        x, self_cache = self.layers(x, jnp.stack([full, sliding]), segments, jnp.stack([c for c, _ in tables]),
                                    jnp.stack([s for _, s in tables]), start, jnp.array(cfg.kinds, jnp.int32),
                                    None if cache is None else cache["self"])
        return self.norm(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def word_embedding_matrix(self):
        return self.embed_tokens.embedding


class GemmaForCausalLM(nn.Module):
    """A Gemma/Gemma2/Gemma3 text decoder with its LM head; `config.model_type` names the transformers class."""

    config: GemmaConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return _HF_ARCHITECTURES[self.config.model_type]

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True, cache=None,
                 segment_ids=None):
        """input_ids [B, T], attention_mask [B, T] (1 = token, 0 = pad; None = all tokens), position_ids [B, T]
        (None: 0..T-1, or continuing from the cache) -> logits [B, T, V] float32, soft-capped where the config
        says, or (logits, cache) when a cache from `init_cache` is given. Dropout needs the "dropout" rng when not
        deterministic. segment_ids [B, T]: packed rows, as gpt2.CausalLM."""
        body = GemmaModel(self.config, self.dtype, self.gradient_checkpointing, deterministic, name="model")
        out = lm_logits(self, body, input_ids, attention_mask, position_ids, cache, segment_ids)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return out
        logits, new_cache = (out, None) if cache is None else out
        logits = cap * jnp.tanh(logits / cap)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout). The sliding-window
        layers keep all slots too, their mask hiding the old ones."""
        cfg = self.config
        return init_cache(cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim,
                          self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). init_params is Llama's
# (the norms' scales start at 0 here, which Gemma's (1 + scale) makes 1).
FAMILY = Family(
    model_types=tuple(_HF_ARCHITECTURES), config=GemmaConfig, heads={"CausalLM": GemmaForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("model.layers",),
        tied={"lm_head.weight": "model.embed_tokens.weight"},  # applies only when the config ties them
        base_prefix={t: "model" for t in _HF_ARCHITECTURES},
        ignored=(r"\.rotary_emb\.", r"\.embed_scale$"),  # buffers that some checkpoints saved
    ),
)

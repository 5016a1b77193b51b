"""Llama-style decoders (transformers' `llama`, `mistral`, `qwen2` and `qwen3`) as Flax linen modules.

One architecture: RoPE (any rope_type of models/rope.py: default, linear, dynamic, yarn, llama3, longrope), RMSNorm
before attention and MLP, a SwiGLU MLP, grouped-query attention (num_key_value_heads), an LM head tied to the
embeddings or not. The model types differ only in switches, all read from the config:
- llama: `attention_bias` puts biases on q/k/v/o, `mlp_bias` on the MLP; no sliding window.
- mistral: `sliding_window` (when set) limits every layer's attention to the last W slots.
- qwen2: biases on q/k/v only; with `use_sliding_window` the layers from `max_window_layers` on use the window
  (transformers writes that into `layer_types`, which we follow).
- qwen3: as qwen2's window, biases on q/k/v/o only with `attention_bias`, and an RMSNorm over each head's
  features of the queries and keys (`q_norm`, `k_norm`) before RoPE.

Param names copy the PyTorch keys: `model/layers/self_attn/q_proj/kernel` [L, D, N*H] is
`model.layers.{i}.self_attn.q_proj.weight` transposed; `model/norm/scale` is `model.norm.weight`.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D hidden_size, N heads, K key/value heads,
H head_dim, F intermediate_size, V vocab_size, L layers.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flaxtrain.models.attention import (Structure, attention, causal_structure, default_positions, distinct_windows,
                                        init_cache, kernel_segments, layer_masks, next_cache, write_cache)
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import CausalLM, init_params
from flaxtrain.models.layers import RMSNorm, dense
from flaxtrain.models.partitioning import EMBED, HEADS, MLP, embedding_init
from flaxtrain.models.rope import ROPE_TYPES, apply_rope, rope_parameters, rope_tables
from flaxtrain.models.stack import scan_layers

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama/Mistral/Qwen2/Qwen3 `config.json` that the model uses (defaults: llama-7b).

    `rope_parameters` holds transformers 5's `rope_parameters` dict as sorted (key, value) pairs (hashable);
    `rope_theta` there wins over the field of that name, kept for configs built by hand. See `rope`.

    `sliding_window` and `layer_types` hold what the layers do after `from_hf` has applied each model type's rules:
    a layer of type "sliding_attention" sees the last `sliding_window` slots; with layer_types None every layer is
    "sliding_attention" if sliding_window is set, else "full_attention".
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: tuple[tuple[str, Any], ...] = ()
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        if self.model_type not in _HF_ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not Llama-like; expected one of "
                             f"{list(_HF_ARCHITECTURES)}")
        if self.hidden_act not in ACT_FNS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACT_FNS)}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of {self.kv_heads} "
                             "key/value heads")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(_LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {_LAYER_TYPES} for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.rope["rope_type"] not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope['rope_type']!r} is not supported; supported: {list(ROPE_TYPES)}")
        if self.rope.get("partial_rotary_factor", 1.0) != 1.0:  # transformers' Llama rotates whole heads only
            raise ValueError(f"partial_rotary_factor {self.rope['partial_rotary_factor']} is not supported by "
                             f"{self.model_type}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "LlamaConfig":
        """From a transformers `LlamaConfig`/`MistralConfig`/`Qwen2Config`/`Qwen3Config`; raises ValueError on what
        this model lacks (a rope_type not in models/rope.py, partial rotary, other attention patterns)."""
        model_type = hf_config.model_type
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        values["rope_parameters"] = rope_parameters(hf_config)
        values["rope_theta"] = dict(values["rope_parameters"])["rope_theta"]
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        # Only what transformers' modeling code of each type reads: a field it ignores is ignored here too.
        if model_type == "llama":  # Llama's code has no sliding window
            values.update(sliding_window=None, layer_types=None)
        elif model_type == "qwen3":  # Qwen3's code: attention_bias on q/k/v/o, none on the MLP
            values.update(mlp_bias=False)
        else:  # Mistral's and Qwen2's code has fixed biases (Qwen2's on q/k/v, see qkv_bias)
            values.update(attention_bias=False, mlp_bias=False)
        if model_type == "mistral" or values["sliding_window"] is None:
            # Mistral: the window (if set) on every layer. Qwen2 without use_sliding_window: sliding_window is None.
            values["layer_types"] = None
        elif values["layer_types"] is not None:
            values["layer_types"] = tuple(values["layer_types"])
        return cls(**values)

    @property
    def rope(self) -> dict:
        """The RoPE parameters for models/rope.py: rope_type (default "default"), rope_theta, the scaling's."""
        return {"rope_type": "default", "rope_theta": self.rope_theta, **dict(self.rope_parameters)}

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full causal attention)."""
        default = "sliding_attention" if self.sliding_window else "full_attention"
        types = self.layer_types or (default,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)


def max_positions(config: LlamaConfig) -> int:
    """The sequence length the model was configured (and trained) for; RoPE itself sets no hard limit."""
    return config.max_position_embeddings


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, structure, cos, sin, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S] and its `layer_structure` (None with a cache), cos/sin [B, T, H],
        layer_cache None or {"key", "value"} [B, S, K, H] -> ([B, T, D], this layer's updated cache or None)."""
        cfg = self.config
        n, k, h = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size

        def project(heads, name):  # -> [B, T, heads, H]
            layer = dense(cfg.initializer_range, self.dtype, heads * h, name, (EMBED, HEADS), use_bias=cfg.qkv_bias)
            return layer(x).reshape(*x.shape[:2], heads, h)

        q, key = project(n, "q_proj"), project(k, "k_proj")
        if cfg.model_type == "qwen3":  # normalized over each head's H features, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            key = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(key)
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        value = project(k, "v_proj")
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, key, value, index)
            key, value = layer_cache["key"], layer_cache["value"]
        out = attention(q, key, value, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                        structure=structure)
        out = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "o_proj", (HEADS, EMBED), use_bias=cfg.o_bias)(
            out.reshape(*x.shape[:2], n * h))
        return out, layer_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """SwiGLU: down(act(gate(x)) * up(x)), [B, T, D] -> [B, T, D] through F."""
        cfg = self.config
        mlp_dense = functools.partial(dense, cfg.initializer_range, self.dtype, use_bias=cfg.mlp_bias)
        gate = ACT_FNS[cfg.hidden_act](mlp_dense(cfg.intermediate_size, name="gate_proj", axes=(EMBED, MLP))(x))
        up = mlp_dense(cfg.intermediate_size, name="up_proj", axes=(EMBED, MLP))(x)
        return mlp_dense(cfg.hidden_size, name="down_proj", axes=(MLP, EMBED))(gate * up)


def layer_structure(config, segments, which) -> Structure | None:
    """The structure of a layer's causal mask (its sliding window picked by `which` among the config's), None
    without segments."""
    return causal_structure(segments, distinct_windows(config.layer_windows), which)


class LlamaDecoderLayer(nn.Module):
    """One block. `masks` [M, B, 1, T, S] holds one mask per distinct window and `which` (scanned, [L]) picks this
    layer's, so that layers with and without a sliding window share one scan; `segments` [B, T] (None with a cache)
    are the masks' segments, attention.kernel_segments."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, masks, segments, cos, sin, index, which, layer_cache):
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, self.dtype)
        h, layer_cache = LlamaAttention(cfg, self.dtype, name="self_attn")(
            norm(name="input_layernorm")(x), masks[which], layer_structure(cfg, segments, which), cos, sin, index,
            layer_cache, self.deterministic)
        x = x + h
        return x + LlamaMLP(cfg, self.dtype, name="mlp")(norm(name="post_attention_layernorm")(x)), layer_cache


class LlamaModel(nn.Module):
    """The body: `embed_tokens`, the scanned `layers`, the final `norm`. `deterministic` is an attribute so that
    setup can build the scanned layers."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    decoder_layer = LlamaDecoderLayer  # not a field: what a subclass (phi3.Phi3Model) swaps

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                     embedding_init=embedding_init(cfg.initializer_range))
        self.layers = scan_layers(self.decoder_layer, cfg.num_hidden_layers, self.gradient_checkpointing,
                                  in_axes=(nn.broadcast,) * 5 + (0, 0))(cfg, self.dtype, self.deterministic)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See LlamaForCausalLM."""
        cfg = self.config
        start = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache, segment_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(position_ids, cfg.head_size, cfg.rope, cfg.max_position_embeddings, self.dtype)
        masks, which, valid = layer_masks(attention_mask, cache, cfg.layer_windows, segment_ids)
        segments = kernel_segments(attention_mask, cache, segment_ids)
        x, self_cache = self.layers(x, masks, segments, cos, sin, start, which,
                                    None if cache is None else cache["self"])
        return self.norm(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def word_embedding_matrix(self):
        return self.embed_tokens.embedding


class LlamaForCausalLM(CausalLM):
    """A Llama/Mistral/Qwen2/Qwen3 decoder with its LM head; `config.model_type` names the transformers class."""

    config: LlamaConfig
    body, body_name = LlamaModel, "model"

    @property
    def hf_architecture(self) -> str:
        return _HF_ARCHITECTURES[self.config.model_type]

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        cfg = self.config
        return init_cache(cfg.num_hidden_layers, batch_size, max_length, cfg.kv_heads, cfg.head_size, self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is GPT-2's (the
# modules' own initializers: normal(initializer_range) weights, RMSNorm scales 1, as transformers).
FAMILY = Family(
    model_types=tuple(_HF_ARCHITECTURES), config=LlamaConfig, heads={"CausalLM": LlamaForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("model.layers",),
        tied={"lm_head.weight": "model.embed_tokens.weight"},  # applies only when the config ties them
        base_prefix={model_type: "model" for model_type in _HF_ARCHITECTURES},
        ignored=(r"\.rotary_emb\.inv_freq$",),  # a buffer that older checkpoints saved
    ),
)

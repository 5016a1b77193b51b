"""Phi-3 (transformers' `phi3`: Phi-3-mini-4k/-128k, Phi-3.5-mini) as Flax linen modules, built on llama.py.

A Llama-style decoder (RMSNorm, SwiGLU, grouped-query attention, llama.LlamaModel's body and scan) with:
- fused projections, kept under their PyTorch names so that checkpoints map by the generic rules:
  `self_attn/qkv_proj/kernel` [L, D, (N + 2K) * H] (queries, then keys, then values) and `mlp/gate_up_proj/kernel`
  [L, D, 2F] (gate, then up);
- partial rotary (`partial_rotary_factor`: RoPE on the first R features of each head) and "longrope" scaling
  (-128k: short factors up to `original_max_position_embeddings`, long ones past it), see models/rope.py;
- a sliding window on every layer when `sliding_window` is set (-4k: 2047), dropout `resid_pdrop` on both residual
  branches, no biases.

Generation with longrope: transformers' Phi3ForCausalLM drops its cache at the step where the sequence (slots, pads
included) first passes original_max_position_embeddings, and recomputes every token, so that the keys of the earlier
ones use the frequencies of the new length. We do the same inside the cached step: a longrope model's cache also
keeps the tokens and positions it has seen, and that one step runs the whole sequence again (`lax.cond`).

Shapes as llama.py: B batch, T new tokens, S cache slots, D hidden_size, N heads, K key/value heads, H head_dim,
F intermediate_size, V vocab_size, L layers.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from flaxtrain.models.attention import attention, default_positions, init_cache, write_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import LMHead, tied_logits
from flaxtrain.models.layers import dense
from flaxtrain.models.llama import LlamaModel, RMSNorm, init_params, layer_structure, max_positions
from flaxtrain.models.partitioning import EMBED, HEADS, MLP
from flaxtrain.models.rope import apply_rope, rope_parameters


@dataclasses.dataclass(frozen=True)
class Phi3Config:
    """The fields of a Hugging Face Phi-3 `config.json` that the model uses (defaults: Phi-3-mini-4k).

    `rope_parameters`: transformers 5's dict (rope_type "default" or "longrope", rope_theta, partial_rotary_factor,
    short/long factors) as sorted (key, value) pairs, see models/rope.py.
    """

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_parameters: tuple[tuple[str, Any], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))
    resid_pdrop: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000
    model_type: str = "phi3"

    def __post_init__(self):
        if self.hidden_act not in ACT_FNS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACT_FNS)}")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of {self.kv_heads} "
                             "key/value heads")
        if self.rope["rope_type"] not in ("default", "longrope"):
            raise ValueError(f"phi3 rope_type {self.rope['rope_type']!r} is not supported; supported: "
                             "['default', 'longrope']")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "Phi3Config":
        """From a transformers `Phi3Config`; raises ValueError on a rope_type other than default and longrope.
        (`embd_pdrop` is ignored, as transformers 5's Phi3Model ignores it.)"""
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        values["rope_parameters"] = rope_parameters(hf_config, supported=("default", "longrope"))
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)

    @property
    def rope(self) -> dict:
        return {"rope_type": "default", "rope_theta": 10000.0, **dict(self.rope_parameters)}

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads  # transformers' Phi-3 has no head_dim setting

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return (self.sliding_window,) * self.num_hidden_layers


class Phi3Attention(nn.Module):
    config: Phi3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, structure, cos, sin, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S] and its structure (None with a cache), cos/sin [B, T, R] -> ([B, T, D], the
        layer's updated cache or None)."""
        cfg = self.config
        n, k, h = cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        shape = x.shape[:2]
        qkv = dense(cfg.initializer_range, self.dtype, (n + 2 * k) * h, "qkv_proj", (EMBED, HEADS),
                    use_bias=False)(x)  # [B, T, (N+2K)H]
        q, key, value = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
        q, key = apply_rope(q.reshape(*shape, n, h), cos, sin), apply_rope(key.reshape(*shape, k, h), cos, sin)
        value = value.reshape(*shape, k, h)
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, key, value, index)
            key, value = layer_cache["key"], layer_cache["value"]
        out = attention(q, key, value, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                        structure=structure)
        return dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "o_proj", (HEADS, EMBED), use_bias=False)(
            out.reshape(*shape, n * h)), layer_cache


class Phi3MLP(nn.Module):
    config: Phi3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """SwiGLU through one fused projection: [B, T, D] -> gate, up [B, T, F] -> [B, T, D]."""
        cfg = self.config
        gate_up = dense(cfg.initializer_range, self.dtype, 2 * cfg.intermediate_size, "gate_up_proj", (EMBED, MLP),
                        use_bias=False)(x)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "down_proj", (MLP, EMBED), use_bias=False)(
            ACT_FNS[cfg.hidden_act](gate) * up)


class Phi3DecoderLayer(nn.Module):
    """One block, with llama.LlamaDecoderLayer's interface (masks [M, B, 1, T, S] and `which` pick its mask,
    `segments` its structure)."""

    config: Phi3Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, masks, segments, cos, sin, index, which, layer_cache):
        cfg = self.config
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, self.dtype)
        dropout = Dropout(cfg.resid_pdrop, deterministic=self.deterministic)  # on both branches, unlike Llama
        h, layer_cache = Phi3Attention(cfg, self.dtype, name="self_attn")(
            norm(name="input_layernorm")(x), masks[which], layer_structure(cfg, segments, which), cos, sin, index,
            layer_cache, self.deterministic)
        x = x + dropout(h)
        return x + dropout(Phi3MLP(cfg, self.dtype, name="mlp")(norm(name="post_attention_layernorm")(x))), \
            layer_cache


class Phi3Model(LlamaModel):
    """llama.LlamaModel (embed_tokens, scanned layers, norm; RoPE tables from the config) with Phi-3's layers."""

    decoder_layer = Phi3DecoderLayer


class Phi3ForCausalLM(nn.Module):
    """Phi-3 with its LM head (transformers' Phi3ForCausalLM)."""

    config: Phi3Config
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    hf_architecture = "Phi3ForCausalLM"

    @property
    def _recomputes(self) -> bool:
        """Whether cached steps may rerun the sequence (longrope: see the module docstring)."""
        return self.config.rope["rope_type"] == "longrope"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True, cache=None,
                 segment_ids=None):
        """input_ids [B, T], attention_mask [B, T] (1 = token, 0 = pad; None = all tokens), position_ids [B, T]
        (None: 0..T-1, or continuing from the cache) -> logits [B, T, V] float32, or (logits, cache) when a cache
        from `init_cache` is given. Dropout needs the "dropout" rng when not deterministic. segment_ids [B, T]:
        packed rows, as gpt2.CausalLM."""
        cfg = self.config
        body = Phi3Model(cfg, self.dtype, self.gradient_checkpointing, deterministic, name="model")
        head = None if cfg.tie_word_embeddings else LMHead(cfg.vocab_size, cfg.initializer_range, name="lm_head")

        def logits(x):
            return tied_logits(x, body.word_embedding_matrix()) if head is None else head(x)

        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if cache is None:
            return logits(body(input_ids, attention_mask, position_ids, None, segment_ids)[0])
        if not self._recomputes or segment_ids is not None:  # (segment_ids with a cache: causal_mask refuses them)
            x, cache = body(input_ids, attention_mask, position_ids, cache, segment_ids)
            return logits(x), cache

        index, length = cache["index"], input_ids.shape[1]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache)
        seen = {"tokens": lax.dynamic_update_slice(cache["tokens"], input_ids.astype(jnp.int32), (0, index)),
                "positions": lax.dynamic_update_slice(cache["positions"], position_ids.astype(jnp.int32),
                                                      (0, index))}
        kv = {name: cache[name] for name in ("index", "self", "mask")}

        def step(mdl, kv):
            x, kv = body(input_ids, attention_mask, position_ids, kv)
            return logits(x), kv

        def rerun(mdl, kv):  # every slot again from an empty cache; the slots not yet written are masked out
            valid = lax.dynamic_update_slice(kv["mask"], attention_mask.astype(bool), (0, index))
            empty = {"index": jnp.zeros_like(index), "self": kv["self"], "mask": jnp.zeros_like(kv["mask"])}
            x, kv = body(seen["tokens"], valid.astype(jnp.int32), seen["positions"], empty)
            x = lax.dynamic_slice_in_dim(x, index, length, axis=1)
            return logits(x), {**kv, "index": index + length}

        # transformers' condition (Phi3ForCausalLM.prepare_inputs_for_generation): the sequence reaches
        # original_max_position_embeddings + 1 slots while the cache holds at most that many.
        omp = cfg.original_max_position_embeddings
        crossing = (index > 0) & (index + length >= omp + 1) & (index <= omp)
        out, kv = nn.cond(crossing, rerun, step, self, kv)
        return out, {**kv, **seen}

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout), plus, with longrope,
        "tokens" and "positions" [B, S] int32 of the slots written."""
        cfg = self.config
        cache = init_cache(cfg.num_hidden_layers, batch_size, max_length, cfg.kv_heads, cfg.head_size, self.dtype)
        if self._recomputes:
            cache.update(tokens=jnp.zeros((batch_size, max_length), jnp.int32),
                         positions=jnp.zeros((batch_size, max_length), jnp.int32))
        return cache


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py).
FAMILY = Family(
    model_types=("phi3",), config=Phi3Config, heads={"CausalLM": Phi3ForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("model.layers",),
        tied={"lm_head.weight": "model.embed_tokens.weight"},  # applies only when the config ties them
        base_prefix={"phi3": "model"},
        ignored=(r"\.rotary_emb\.inv_freq$",),
    ),
)

"""GPT-Neo (EleutherAI's gpt-neo-125M ... 2.7B) causal language model as Flax linen modules.

GPT-2's block with three differences, as transformers' `modeling_gpt_neo.py` has them:
- each layer's attention is "global" (causal) or "local" (causal over the last `window_size` slots, itself
  included), as `attention_layers` lists them (the config's `attention_types` expanded, e.g. global and local
  alternating). Both kinds share one scan: the body makes one mask per kind and `which` picks each layer's.
- the attention logits are not scaled by 1/sqrt(head size) (EleutherAI trained it so);
- q/k/v are Linears without bias under `attn.attention` (out_proj has one), the MLP is `c_fc`/`c_proj` Linears.

Param names copy the PyTorch keys: `transformer/h/attn/attention/q_proj/kernel` [L, D, D] is
`transformer.h.{i}.attn.attention.q_proj.weight` transposed. The LM head is tied to `wte` unless the config says
otherwise (gpt2.lm_logits, shared by the decoders).

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D hidden_size, N heads, H head size,
F intermediate_size, V vocab_size, L layers.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flaxtrain.models.attention import attention, default_positions, init_cache, layer_masks, next_cache, write_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import CausalLM, init_params
from flaxtrain.models.layers import dense, layer_norm
from flaxtrain.models.partitioning import EMBED, HEADS, MLP, POSITIONS, embedding_init
from flaxtrain.models.stack import scan_layers

_ATTENTION_TYPES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class GPTNeoConfig:
    """The fields of a Hugging Face GPT-Neo `config.json` that the model uses (defaults: gpt-neo-1.3B).
    `attention_layers` is each layer's attention type, as transformers expands `attention_types`."""

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int | None = None  # None: 4 * hidden_size
    attention_layers: tuple[str, ...] = ("global", "local") * 12
    window_size: int = 256
    activation_function: str = "gelu_new"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt_neo"

    def __post_init__(self):
        if self.model_type != "gpt_neo":
            raise ValueError(f"model_type {self.model_type!r} is not GPT-Neo")
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if len(self.attention_layers) != self.num_layers or not set(self.attention_layers) <= set(_ATTENTION_TYPES):
            raise ValueError(f"attention_layers must give one of {_ATTENTION_TYPES} for each of the {self.num_layers} "
                             f"layers, got {self.attention_layers}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GPTNeoConfig":
        """From a transformers `GPTNeoConfig`; raises ValueError on what this model lacks (attention types other
        than global and local)."""
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        layers = getattr(hf_config, "attention_layers", None)
        if layers is None and getattr(hf_config, "attention_types", None) is not None:
            layers = [kind for kinds, repeat in hf_config.attention_types for _ in range(repeat) for kind in kinds]
        values["attention_layers"] = tuple(layers) if layers is not None else cls.attention_layers
        if unknown := set(values["attention_layers"]) - set(_ATTENTION_TYPES):
            raise ValueError(f"gpt_neo config has attention_layers {sorted(unknown)}; only {_ATTENTION_TYPES} are "
                             "supported")
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's window (None: global)."""
        return tuple(self.window_size if kind == "local" else None for kind in self.attention_layers)


def max_positions(config: GPTNeoConfig) -> int:
    """The longest sequence (prompt + generated tokens) the model has positions for."""
    return config.max_position_embeddings


class GPTNeoSelfAttention(nn.Module):
    config: GPTNeoConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S], layer_cache None or {"key", "value"} [B, S, N, H] -> ([B, T, D], this
        layer's updated cache or None)."""
        cfg = self.config

        def project(name):  # -> [B, T, N, H]
            layer = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, name, (EMBED, HEADS), use_bias=False)
            return layer(x).reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, k, v, index)
            k, v = layer_cache["key"], layer_cache["value"]
        # scale 1: GPT-Neo's logits are q.k, unscaled.
        out = attention(q, k, v, mask, scale=1.0, dropout_rate=cfg.attention_dropout, deterministic=deterministic)
        out = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "out_proj", (HEADS, EMBED),
                    use_bias=True)(out.reshape(x.shape))
        return Dropout(cfg.resid_dropout)(out, deterministic=deterministic), layer_cache


class GPTNeoAttention(nn.Module):
    """transformers' GPTNeoAttention: a shell whose one child is the attention, so the keys read attn.attention.*."""

    config: GPTNeoConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, *args):
        return GPTNeoSelfAttention(self.config, self.dtype, name="attention")(*args)


class GPTNeoMLP(nn.Module):
    config: GPTNeoConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = dense(cfg.initializer_range, self.dtype, cfg.intermediate_size or 4 * cfg.hidden_size, "c_fc", (EMBED, MLP),
                  use_bias=True)(x)
        h = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "c_proj", (MLP, EMBED),
                  use_bias=True)(ACT_FNS[cfg.activation_function](h))
        return Dropout(cfg.resid_dropout)(h, deterministic=deterministic)


class GPTNeoBlock(nn.Module):
    """One pre-LayerNorm block, GPT-2's. `masks` [M, B, 1, T, S] holds one mask per attention type and `which`
    (scanned, [L]) picks this layer's; the layer's cache slice comes in and goes out as the scanned input/output."""

    config: GPTNeoConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, masks, index, which, layer_cache):
        cfg = self.config
        h, layer_cache = GPTNeoAttention(cfg, self.dtype, name="attn")(
            layer_norm(cfg.layer_norm_epsilon, self.dtype, "ln_1")(x), masks[which], index, layer_cache,
            self.deterministic)
        x = x + h
        x = x + GPTNeoMLP(cfg, self.dtype, name="mlp")(layer_norm(cfg.layer_norm_epsilon, self.dtype, "ln_2")(x),
                                                       self.deterministic)
        return x, layer_cache


class GPTNeoModel(nn.Module):
    """The body: `wte`, `wpe`, the scanned blocks `h`, the final LayerNorm `ln_f`. `deterministic` is an attribute
    so that setup can build the scanned blocks."""

    config: GPTNeoConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)
        self.wte = embed(cfg.vocab_size, embedding_init=embedding_init(cfg.initializer_range))
        self.wpe = embed(cfg.max_position_embeddings,
                         embedding_init=embedding_init(cfg.initializer_range, (POSITIONS, EMBED)))
        self.drop = Dropout(cfg.embed_dropout)
        self.h = scan_layers(GPTNeoBlock, cfg.num_layers, self.gradient_checkpointing,
                             in_axes=(nn.broadcast, nn.broadcast, 0, 0))(cfg, self.dtype, self.deterministic)
        self.ln_f = layer_norm(cfg.layer_norm_epsilon, self.dtype, None)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See GPTNeoForCausalLM."""
        cfg = self.config
        start = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache, segment_ids)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids), deterministic=self.deterministic)
        # The local window counts slots, as transformers' mask buffer does (padding inside the window counts).
        masks, which, valid = layer_masks(attention_mask, cache, cfg.layer_windows, segment_ids)
        x, self_cache = self.h(x, masks, start, which, None if cache is None else cache["self"])
        return self.ln_f(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def word_embedding_matrix(self):
        return self.wte.embedding


class GPTNeoForCausalLM(CausalLM):
    """GPT-Neo with its LM head (transformers' GPTNeoForCausalLM)."""

    config: GPTNeoConfig
    body, body_name = GPTNeoModel, "transformer"
    hf_architecture = "GPTNeoForCausalLM"

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        if max_length > max_positions(self.config):
            raise ValueError(f"{max_length} tokens are more than GPT-Neo's {max_positions(self.config)} positions")
        cfg = self.config
        return init_cache(cfg.num_layers, batch_size, max_length, cfg.num_heads, cfg.head_dim, self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is GPT-2's.
FAMILY = Family(
    model_types=("gpt_neo",), config=GPTNeoConfig, heads={"CausalLM": GPTNeoForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("transformer.h",),
        tied={"lm_head.weight": "transformer.wte.weight"},  # applies only when the config ties them (the default)
        base_prefix={"gpt_neo": "transformer"},
        ignored=(r"\.attn\.attention\.(masked_)?bias$",),  # mask buffers that the Hub's checkpoints saved
    ),
)

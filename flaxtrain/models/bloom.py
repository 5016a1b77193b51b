"""BLOOM (transformers' `bloom`) causal language models as Flax linen modules.

No position embeddings: ALiBi (models/alibi.py) adds each head's slope times the key's position to the attention
logits, the positions counted over the real tokens of the attention mask (or of the cache's slots when generating),
as transformers builds it; in a packed row (segment_ids) each key's position within its example (position_ids, or
counted from segment_ids). A LayerNorm right after the token embeddings (`word_embeddings_layernorm`), pre-LayerNorm
blocks whose residual is optionally the normed input (`apply_residual_connection_post_layernorm`), a GELU (tanh
approximation) MLP of 4 * D, the final `ln_f`, the LM head tied to the embeddings.

Param names copy the PyTorch keys: `transformer/h/self_attention/query_key_value/kernel` [L, D, 3D] is
`transformer.h.{i}.self_attention.query_key_value.weight` transposed. The fused projection's outputs are laid out
[N, 3, H] (Megatron's: each head's query, key and value together), not [3, N, H] as GPT-2's c_attn.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D hidden_size, N heads, H head size,
V vocab_size, L layers.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models.alibi import alibi_bias
from flaxtrain.models.attention import attention, causal_mask, default_positions, init_cache, next_cache, write_cache
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import CausalLM, init_params
from flaxtrain.models.layers import dense, layer_norm
from flaxtrain.models.partitioning import EMBED, HEADS, MLP, embedding_init
from flaxtrain.models.stack import scan_layers

# BLOOM's training length: ALiBi sets no hard limit and config.json has no field for it (`seq_length` where present).
TRAINING_LENGTH = 2048


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """The fields of a Hugging Face BLOOM `config.json` that the model uses (defaults: bloom-560m).
    seq_length: the length `max_positions` reports (config.json's `seq_length` if it has one, else 2048)."""

    vocab_size: int = 250880
    hidden_size: int = 1024
    n_layer: int = 24
    n_head: int = 16
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    apply_residual_connection_post_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    seq_length: int = TRAINING_LENGTH
    pad_token_id: int | None = 3
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = "bloom"

    def __post_init__(self):
        if self.model_type != "bloom":
            raise ValueError(f"model_type {self.model_type!r} is not BLOOM")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.hidden_size % self.n_head:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.n_head} heads")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BloomConfig":
        """From a transformers `BloomConfig`. Nothing is refused: `pretraining_tp` with `slow_but_exact` only sums
        the output projections in slices (the same function, other rounding), and the other Megatron settings
        (`masked_softmax_fusion`, `bias_dropout_fusion`, `n_inner`, ...) are ignored by transformers' modeling code
        too."""
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        values["seq_length"] = getattr(hf_config, "seq_length", None) or TRAINING_LENGTH
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head


def max_positions(config: BloomConfig) -> int:
    """The sequence length BLOOM was trained for (ALiBi itself extrapolates; nothing here enforces it)."""
    return config.seq_length


class BloomAttention(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, bias, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S], bias (ALiBi) [B, N, 1, S], layer_cache None or {"key", "value"}
        [B, S, N, H] -> ([B, T, D] before the residual's dropout, this layer's updated cache or None)."""
        cfg = self.config
        qkv = dense(cfg.initializer_range, self.dtype, 3 * cfg.hidden_size, "query_key_value", (EMBED, HEADS))(x)
        qkv = qkv.reshape(*x.shape[:2], cfg.n_head, 3, cfg.head_dim)  # [B, T, N, 3, H]
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, k, v, index)
            k, v = layer_cache["key"], layer_cache["value"]
        out = attention(q, k, v, mask, bias=bias, dropout_rate=cfg.attention_dropout, deterministic=deterministic)
        out = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "dense", (HEADS, EMBED))(out.reshape(x.shape))
        return out, layer_cache


class BloomMLP(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        # Megatron's tanh GELU; its constant 0.79788456 is sqrt(2/pi) to float32 precision.
        h = jax.nn.gelu(dense(cfg.initializer_range, self.dtype, 4 * cfg.hidden_size, "dense_h_to_4h", (EMBED, MLP))(x),
                        approximate=True)
        return dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "dense_4h_to_h", (MLP, EMBED))(h)


class BloomBlock(nn.Module):
    """One pre-LayerNorm block; with apply_residual_connection_post_layernorm the residuals are the normed inputs.
    `deterministic` is an attribute so that nn.scan and nn.remat see only arrays; the layer's cache slice comes in
    as the scanned input and goes out as the scanned output."""

    config: BloomConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, bias, index, layer_cache):
        cfg = self.config
        dropout = lambda y: Dropout(cfg.hidden_dropout)(y, deterministic=self.deterministic)  # noqa: E731
        normed = layer_norm(cfg.layer_norm_epsilon, self.dtype, "input_layernorm")(x)
        h, layer_cache = BloomAttention(cfg, self.dtype, name="self_attention")(
            normed, mask, bias, index, layer_cache, self.deterministic)
        x = (normed if cfg.apply_residual_connection_post_layernorm else x) + dropout(h)
        normed = layer_norm(cfg.layer_norm_epsilon, self.dtype, "post_attention_layernorm")(x)
        h = BloomMLP(cfg, self.dtype, name="mlp")(normed)
        return (normed if cfg.apply_residual_connection_post_layernorm else x) + dropout(h), layer_cache


class BloomModel(nn.Module):
    """The body (`transformer.`): `word_embeddings`, `word_embeddings_layernorm`, the scanned blocks `h`, `ln_f`.
    `deterministic` is an attribute so that setup can build the scanned blocks."""

    config: BloomConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                        embedding_init=embedding_init(cfg.initializer_range))
        self.word_embeddings_layernorm = layer_norm(cfg.layer_norm_epsilon, self.dtype, None)
        self.h = scan_layers(BloomBlock, cfg.n_layer, self.gradient_checkpointing,
                             in_axes=(nn.broadcast,) * 3 + (0,))(cfg, self.dtype, self.deterministic)
        self.ln_f = layer_norm(cfg.layer_norm_epsilon, self.dtype, None)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See BloomForCausalLM for position_ids."""
        start = 0 if cache is None else cache["index"]
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        mask, valid = causal_mask(attention_mask, cache, segment_ids=segment_ids)
        if segment_ids is None:  # as transformers: ALiBi counts the positions from the mask
            bias = alibi_bias(valid, self.config.n_head)
        else:  # a packed row: (without a cache) the keys are the new tokens, each at its position in its example
            if position_ids is None:
                position_ids = default_positions(input_ids, None, segment_ids)
            bias = alibi_bias(valid, self.config.n_head, position_ids)
        x, self_cache = self.h(x, mask, bias, start, None if cache is None else cache["self"])
        return self.ln_f(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def word_embedding_matrix(self):
        """[V, D] float32: the LM head's weights when tied to the input embeddings."""
        return self.word_embeddings.embedding


class BloomForCausalLM(CausalLM):
    """BLOOM with its LM head (tied to `transformer.word_embeddings` unless tie_word_embeddings is False).
    position_ids are ignored without segment_ids (accepted for flaxtrain.generate; transformers' BLOOM ignores them
    too): ALiBi counts the positions from the mask. With segment_ids (packed rows) they are each key's position in
    its example (None: counted from segment_ids)."""

    config: BloomConfig
    body, body_name = BloomModel, "transformer"
    hf_architecture = "BloomForCausalLM"

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        cfg = self.config
        return init_cache(cfg.n_layer, batch_size, max_length, cfg.n_head, cfg.head_dim, self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is GPT-2's.
FAMILY = Family(
    model_types=("bloom",), config=BloomConfig, heads={"CausalLM": BloomForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("transformer.h",),
        tied={"lm_head.weight": "transformer.word_embeddings.weight"},  # applies only when the config ties them
        base_prefix={"bloom": "transformer"},
    ),
)

"""ModernBERT encoder with masked-LM and sequence-classification heads, as Flax linen modules (transformers 5's
`modeling_modernbert.py`).

A pre-norm encoder: embeddings (no positions) -> LayerNorm, then per layer x + Wo(attn(attn_norm(x))) and
x + mlp(mlp_norm(x)), then final_norm. Attention has a fused `Wqkv`, RoPE on queries and keys, and alternates global
layers (every key, RoPE base global_rope_theta) with local ones (keys within local_attention // 2 positions either
way, base local_rope_theta): `layer_types`, every global_attn_every_n_layers-th layer global. The MLP is GeGLU (`Wi`
to 2F, act(first half) * second half, `Wo`). LayerNorms have no bias unless norm_bias.

transformers unpads the batch for flash attention (its sdpa and eager paths mask instead); here every sequence is
padded to T with positions 0..T-1 and pad keys masked, which computes the same on the real tokens of right-padded
inputs.

The first layer's `attn_norm` is an Identity, so layer 0 has one param fewer than the others and the layers cannot be
stacked whole: everything but attn_norm is scanned (`model/layers/...` [L, ...], keys `model.layers.{i}...`), and the
attn_norm params of layer i >= 1 sit outside the scan in `model/attn_norm_{i}`, which the `renamed` rule (FAMILY.hf,
up to MAX_LAYERS) saves as `model.layers.{i}.attn_norm`; they are stacked into the scan as a per-layer input.

Shapes: B batch, T length, D hidden_size, N heads, H head size, F intermediate_size, V vocab_size, L layers.
"""

import dataclasses
import types
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import bert, layers
from flaxtrain.models.attention import attention
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import layer_norm
from flaxtrain.models.partitioning import CLASSES, EMBED, HEADS, MLP, NORM, embedding_init, named
from flaxtrain.models.rope import apply_rope, rope_parameters, rope_tables
from flaxtrain.models.stack import scan_layers

ACT_FNS = bert.ACT_FNS
LAYER_TYPES = ("full_attention", "sliding_attention")
# RoPE variants whose frequencies do not depend on the sequence length seen (see models/rope.py).
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
MAX_LAYERS = 1024  # the `renamed` table below names the attn_norm of layers 1..MAX_LAYERS - 1


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """The fields of a Hugging Face ModernBERT `config.json` that the model uses (defaults: ModernBERT-base)."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" or "sliding_attention"; () = every 3rd global
    local_attention: int = 128
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_pooling: str = "cls"
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    global_rope: tuple = (("rope_theta", 160000.0), ("rope_type", "default"))  # rope.rope_parameters' pairs
    local_rope: tuple = (("rope_theta", 10000.0), ("rope_type", "default"))
    model_type: str = "modernbert"
    num_labels: int = 2
    problem_type: str | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", tuple("full_attention" if i % 3 == 0 else "sliding_attention"
                                                          for i in range(self.num_hidden_layers)))
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ACT_FNS:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported; supported: {sorted(ACT_FNS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling {self.classifier_pooling!r} is not supported; supported: cls, mean")
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types {list(self.layer_types)} is not one of {list(LAYER_TYPES)} for each of "
                             f"{self.num_hidden_layers} layers")
        if not 1 <= self.num_hidden_layers <= MAX_LAYERS:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} is not supported (1 to {MAX_LAYERS})")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModernBertConfig":
        """From a transformers `ModernBertConfig`; raises ValueError naming a setting this model lacks."""
        if not getattr(hf_config, "tie_word_embeddings", True):
            raise ValueError("modernbert config has unsupported settings: tie_word_embeddings=False")
        values = {f.name: getattr(hf_config, f.name, None) for f in dataclasses.fields(cls)}
        rope = getattr(hf_config, "rope_parameters", None) or {}
        for field, layer_type in (("global_rope", "full_attention"), ("local_rope", "sliding_attention")):
            if rope.get(layer_type):
                values[field] = rope_parameters(
                    types.SimpleNamespace(model_type=f"modernbert {layer_type}", rope_parameters=rope[layer_type],
                                          max_position_embeddings=hf_config.max_position_embeddings),
                    supported=ROPE_TYPES)
        values["layer_types"] = tuple(values["layer_types"] or ())
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_global(self) -> np.ndarray:
        """[L] bool: which layers attend to every key."""
        return np.array([t == "full_attention" for t in self.layer_types])


def _dense(config: ModernBertConfig, dtype, features: int, name: str, axes: tuple, use_bias: bool,
           std: float | None = None) -> nn.Dense:
    """A Dense with transformers' init: normal(std) truncated at initializer_cutoff_factor std, zero bias."""
    std = config.initializer_range if std is None else std
    cut = config.initializer_cutoff_factor
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=named(nn.initializers.truncated_normal(std, lower=-cut, upper=cut), *axes),
                    bias_init=named(nn.initializers.zeros_init(), axes[-1]))


def _out_std(config: ModernBertConfig) -> float:
    """The init std of the layers that write into the residual stream (transformers' "out")."""
    return config.initializer_range / (2.0 * config.num_hidden_layers) ** 0.5


class ModernBertAttention(nn.Module):
    config: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cos, sin, deterministic: bool):
        """x [B, T, D], mask broadcastable to [B, 1, T, T] bool, cos/sin [B, T, H] -> [B, T, D]."""
        cfg = self.config
        qkv = _dense(cfg, self.dtype, 3 * cfg.hidden_size, "Wqkv", (EMBED, HEADS), cfg.attention_bias)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(*x.shape[:2], 3, cfg.num_attention_heads, cfg.head_dim), 2, 0)
        # transformers rotates in float32 and casts back.
        q, k = (apply_rope(y.astype(jnp.float32), cos, sin).astype(y.dtype) for y in (q, k))
        out = attention(q, k, v, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic)
        out = _dense(cfg, self.dtype, cfg.hidden_size, "Wo", (HEADS, EMBED), cfg.attention_bias,
                     _out_std(cfg))(out.reshape(x.shape))
        return Dropout(cfg.attention_dropout)(out, deterministic=deterministic)


class ModernBertMLP(nn.Module):
    config: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        """[B, T, D] -> [B, T, D]: Wo(act(x Wi[:F]) * x Wi[F:])."""
        cfg = self.config
        h, gate = jnp.split(_dense(cfg, self.dtype, 2 * cfg.intermediate_size, "Wi", (EMBED, MLP), cfg.mlp_bias)(x),
                            2, axis=-1)
        h = Dropout(cfg.mlp_dropout)(ACT_FNS[cfg.hidden_activation](h) * gate, deterministic=deterministic)
        return _dense(cfg, self.dtype, cfg.hidden_size, "Wo", (MLP, EMBED), cfg.mlp_bias, _out_std(cfg))(h)


class ModernBertEncoderLayer(nn.Module):
    """One pre-norm block; its attn_norm's params come in as inputs (see the module docstring). `(carry, None)` for
    nn.scan, `deterministic` an attribute (see bert.BertLayer)."""

    config: ModernBertConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, masks, rope, norm, is_global, is_first):
        """x [B, T, D]; masks (global [B, 1, 1, T], local [B, 1, T, T]); rope (cos, sin) [2, B, T, H], global
        first; norm (scale, bias) [D] of this layer's attn_norm; is_global, is_first: bool []."""
        cfg = self.config
        mask = jnp.where(is_global, masks[0], masks[1])
        cos, sin = (jnp.where(is_global, table[0], table[1]) for table in rope)
        normed = nn.LayerNorm(epsilon=cfg.norm_eps, use_scale=False, use_bias=False, dtype=self.dtype,
                              use_fast_variance=False)(x)
        normed = (normed * norm[0] + norm[1]).astype(normed.dtype)
        h = jnp.where(is_first, x, normed)  # layer 0's attn_norm is an Identity
        x = x + ModernBertAttention(cfg, self.dtype, name="attn")(h, mask, cos, sin, self.deterministic)
        h = layer_norm(cfg.norm_eps, self.dtype, "mlp_norm", use_bias=cfg.norm_bias)(x)
        return x + ModernBertMLP(cfg, self.dtype, name="mlp")(h, self.deterministic), None


class ModernBertEmbeddings(nn.Module):
    config: ModernBertConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.tok_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                       embedding_init=embedding_init(cfg.initializer_range))
        self.norm = layer_norm(cfg.norm_eps, self.dtype, None, use_bias=cfg.norm_bias)
        self.drop = Dropout(cfg.embedding_dropout)

    def __call__(self, input_ids, deterministic: bool):
        """[B, T] ids -> [B, T, D]: no positions (RoPE turns queries and keys)."""
        return self.drop(self.norm(self.tok_embeddings(input_ids)), deterministic=deterministic)


class ModernBertAttnNorm(nn.Module):
    """The params of one layer's attn_norm (layers 1..L-1): scale [D] and, if norm_bias, bias [D]."""

    config: ModernBertConfig

    @nn.compact
    def __call__(self):
        """-> (scale, bias) [D] float32 (bias zeros without norm_bias)."""
        size = (self.config.hidden_size,)
        scale = self.param("scale", named(nn.initializers.ones_init(), NORM), size, jnp.float32)
        if not self.config.norm_bias:
            return scale, jnp.zeros(size, jnp.float32)
        return scale, self.param("bias", named(nn.initializers.zeros_init(), NORM), size, jnp.float32)


class ModernBertModel(nn.Module):
    config: ModernBertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad): [B, T] ints -> (hidden [B, T, D] after final_norm, the
        word embeddings [V, D] that the MLM decoder is tied to)."""
        cfg = self.config
        embeddings = ModernBertEmbeddings(cfg, self.dtype, name="embeddings")
        x = embeddings(input_ids, deterministic)

        length = input_ids.shape[1]
        keys = attention_mask.astype(bool)[:, None, None, :]  # every query, pads included, sees the non-pad keys
        distance = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :])
        masks = (keys, keys & (distance <= cfg.local_attention // 2))  # transformers' window: |i - j| <= W / 2
        positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        tables = [rope_tables(positions, cfg.head_dim, rope, cfg.max_position_embeddings, jnp.float32)
                  for rope in (cfg.global_rope, cfg.local_rope)]
        rope = tuple(jnp.stack(pair) for pair in zip(*tables))  # (cos, sin) [2, B, T, H]

        # Layer 0's attn_norm is an Identity: its row of ones is never read.
        norms = [(jnp.ones(cfg.hidden_size), jnp.zeros(cfg.hidden_size))]
        norms += [ModernBertAttnNorm(cfg, name=f"attn_norm_{i}")() for i in range(1, cfg.num_hidden_layers)]
        norm = tuple(jnp.stack(column) for column in zip(*norms))  # (scale, bias) [L, D]
        layers = scan_layers(ModernBertEncoderLayer, cfg.num_hidden_layers, self.gradient_checkpointing,
                             in_axes=(nn.broadcast, nn.broadcast, 0, 0, 0))
        x, _ = layers(cfg, self.dtype, deterministic, name="layers")(
            x, masks, rope, norm, jnp.asarray(cfg.is_global), jnp.arange(cfg.num_hidden_layers) == 0)
        return layer_norm(cfg.norm_eps, self.dtype, "final_norm",
                          use_bias=cfg.norm_bias)(x), embeddings.tok_embeddings.embedding


class ModernBertPredictionHead(nn.Module):
    """`head`: dense, classifier_activation, norm, shared by the MLM head and the classifier."""

    config: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _dense(cfg, self.dtype, cfg.hidden_size, "dense", (EMBED, EMBED), cfg.classifier_bias, _out_std(cfg))(x)
        return layer_norm(cfg.norm_eps, self.dtype, "norm",
                          use_bias=cfg.norm_bias)(ACT_FNS[cfg.classifier_activation](x))


class ModernBertForMaskedLM(nn.Module):
    """ModernBERT with `head.{dense, norm}` and `decoder` (tied to the word embeddings; bias its own if
    decoder_bias)."""

    config: ModernBertConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "ModernBertForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (the masked tokens, as
        run_mlm_flax.py asks); token_type_ids is ignored (ModernBERT has none). Dropout needs the "dropout" rng when
        not deterministic."""
        cfg = self.config
        body = ModernBertModel(cfg, self.dtype, self.gradient_checkpointing, name="model")
        hidden, embedding = body(input_ids, attention_mask, deterministic)
        x = ModernBertPredictionHead(cfg, self.dtype, name="head")(bert.at_positions(hidden, positions))
        if cfg.decoder_bias:
            return layers.TiedDecoder(name="decoder")(x, embedding)
        return layers.float32_logits("btd,vd->btv", x, embedding)


class ModernBertForSequenceClassification(nn.Module):
    """ModernBERT pooled (first token, or the mean of the real tokens: classifier_pooling), then `head`, dropout
    and `classifier`."""

    config: ModernBertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "ModernBertForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32; token_type_ids is ignored."""
        cfg = self.config
        hidden, _ = ModernBertModel(cfg, self.dtype, self.gradient_checkpointing, name="model")(
            input_ids, attention_mask, deterministic)
        if cfg.classifier_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.astype(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
        x = ModernBertPredictionHead(cfg, self.dtype, name="head")(pooled)
        x = Dropout(cfg.classifier_dropout)(x, deterministic=deterministic)
        logits = _dense(cfg, self.dtype, cfg.num_labels, "classifier", (EMBED, CLASSES), True,
                        cfg.hidden_size**-0.5)(x)
        return logits.astype(jnp.float32)


def max_positions(config: ModernBertConfig) -> int:
    """The context ModernBERT was trained for (RoPE itself has no table to run out of)."""
    return config.max_position_embeddings


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is BERT's.
FAMILY = Family(
    model_types=("modernbert",), config=ModernBertConfig,
    heads={"MaskedLM": ModernBertForMaskedLM, "SequenceClassification": ModernBertForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("layers",),
        renamed={f"model.attn_norm_{i}": f"model.layers.{i}.attn_norm" for i in range(1, MAX_LAYERS)},
        tied={"decoder.weight": "model.embeddings.tok_embeddings.weight"},
        base_prefix={"modernbert": "model"},
        pretraining_heads=(r"^decoder\.",),
        # The MLM checkpoint's `head` has the classifier's names and shapes: loaded when present (as transformers
        # does), fresh otherwise.
        classifier_head=(r"^classifier\.", r"^head\."),
    ),
)

"""RoFormer encoder with masked-LM and sequence-classification heads, as Flax linen modules.

RoFormer is BERT without position embeddings: each layer rotates its queries and keys (and values, if
rotary_value) by the token's position (rotary position embeddings, https://kexue.fm/archives/8265). Its rotation is
the interleaved layout, pairs (x0, x1), (x2, x3), ... each turned by its own angle, not the rotate_half layout of
Llama (models/rope.py); the angles come from a sinusoidal table [max_position_embeddings, H] whose first half holds
the sines and second half the cosines. Like ELECTRA, its embeddings may be narrower than hidden_size
(embedding_size), then `roformer.embeddings_project` maps them up, and the MLM head maps back down to E before the
tied decoder. Its classifier is RoBERTa's head on the first token, with hidden_act for tanh.

The sinusoidal table is in the checkpoint (`roformer.encoder.embed_positions.weight`, a frozen nn.Embedding in
transformers), so it is a param here too, read as it was saved and never trained: the forward pass stops its
gradient, and its leaf is called `weight` rather than `embedding` so that AdamW's decay mask
(flaxtrain.training.decay_mask) leaves it alone; a zero gradient gives a zero Adam update.

Shapes: B batch, T length, D hidden_size, E embedding_size, N heads, H head size, V vocab_size, P
max_position_embeddings.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import bert
from flaxtrain.models.attention import attention
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import dense, layer_norm, tied_decoder
from flaxtrain.models.partitioning import EMBED, HEADS, KV, MLP, POSITIONS, embedding_init, named
from flaxtrain.models.stack import scan_layers


@dataclasses.dataclass(frozen=True)
class RoFormerConfig(bert.BertConfig):
    """A Hugging Face RoFormer `config.json`'s fields: BERT's plus embedding_size and rotary_value (defaults:
    junnyu/roformer_chinese_base)."""

    vocab_size: int = 50000
    max_position_embeddings: int = 1536
    embedding_size: int | None = None  # None: hidden_size, as transformers fills it in
    rotary_value: bool = False
    model_type: str = "roformer"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("roformer",)

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim % 2:
            raise ValueError(f"RoFormer head size {self.head_dim} (hidden_size / num_attention_heads) is odd: the "
                             "rotary embeddings turn pairs of features")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "RoFormerConfig":
        # transformers' RoFormer classifier drops with hidden_dropout_prob, whatever a classifier_dropout says.
        return dataclasses.replace(super().from_hf(hf_config), classifier_dropout=None)

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size


def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """[P, dim] float32: sin(p / 10000**(2i / dim)) in columns i < dim / 2, the cosines of the same angles after
    them (transformers' RoFormerSinusoidalPositionalEmbedding, computed in float64 as it does)."""
    angles = np.arange(num_positions)[:, None] / np.power(10000, 2 * np.arange(dim // 2) / dim)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def rotate(x, sin, cos):
    """x [B, T, N, H] with each pair (x[2i], x[2i+1]) turned by angle i of its position: sin, cos [T, H / 2].
    Computed in float32, returned in x's dtype."""
    sin, cos = (jnp.repeat(t, 2, axis=-1)[None, :, None, :] for t in (sin, cos))  # θ0 θ0 θ1 θ1 ...
    y = x.astype(jnp.float32)
    turned = jnp.stack([-y[..., 1::2], y[..., ::2]], axis=-1).reshape(y.shape)  # -x1 x0 -x3 x2 ...
    return (y * cos + turned * sin).astype(x.dtype)


class RoFormerEmbeddings(nn.Module):
    """Word and token-type embeddings (no positions), LayerNorm, dropout."""

    config: RoFormerConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.embedding_width, dtype=self.dtype,
                                        param_dtype=jnp.float32, embedding_init=embedding_init(cfg.initializer_range))
        self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.embedding_width, dtype=self.dtype,
                                              param_dtype=jnp.float32,
                                              embedding_init=embedding_init(cfg.initializer_range, (None, EMBED)))
        self.LayerNorm = layer_norm(cfg.layer_norm_eps, self.dtype, None)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        """[B, T] ids, [B, T] segment ids -> [B, T, E]."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class RoFormerSinusoidalPositions(nn.Module):
    """The table `embed_positions.weight` [P, H]: loaded, saved, never trained (see the module docstring)."""

    config: RoFormerConfig

    @nn.compact
    def __call__(self, length: int):
        """-> (sin, cos) [length, H / 2] float32 of positions 0..length-1."""
        cfg = self.config
        init = named(lambda rng, shape, dtype: jnp.asarray(sinusoidal_table(*shape), dtype), POSITIONS, KV)
        table = jax.lax.stop_gradient(self.param("weight", init, (cfg.max_position_embeddings, cfg.head_dim),
                                                 jnp.float32)[:length])
        return table[:, :cfg.head_dim // 2], table[:, cfg.head_dim // 2:]


class RoFormerSelfAttention(nn.Module):
    config: RoFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, sin, cos, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] bool (True = attend to this key), sin, cos [T, H / 2] -> [B, T, D]."""
        cfg = self.config
        split = lambda y: y.reshape(*y.shape[:2], cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        q, k, v = (split(dense(cfg.initializer_range, self.dtype, cfg.hidden_size, name, (EMBED, HEADS))(x))
                   for name in ("query", "key", "value"))
        q, k = rotate(q, sin, cos), rotate(k, sin, cos)
        if cfg.rotary_value:
            v = rotate(v, sin, cos)
        out = attention(q, k, v, mask, dropout_rate=cfg.attention_probs_dropout_prob, deterministic=deterministic)
        return out.reshape(*x.shape[:2], cfg.hidden_size)


class RoFormerAttention(nn.Module):
    config: RoFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, sin, cos, deterministic: bool):
        h = RoFormerSelfAttention(self.config, self.dtype, name="self")(x, mask, sin, cos, deterministic)
        return bert.BertOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class RoFormerLayer(nn.Module):
    """BERT's block with rotary self-attention; `(carry, None)` for nn.scan (see BertLayer)."""

    config: RoFormerConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, sin, cos):
        x = RoFormerAttention(self.config, self.dtype, name="attention")(x, mask, sin, cos, self.deterministic)
        h = bert.BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return bert.BertOutput(self.config, self.dtype, MLP, name="output")(h, x, self.deterministic), None


class RoFormerEncoder(nn.Module):
    config: RoFormerConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] -> [B, T, D]; params of `layer` are stacked [L, ...]."""
        sin, cos = RoFormerSinusoidalPositions(self.config, name="embed_positions")(x.shape[1])
        layers = scan_layers(RoFormerLayer, self.config.num_hidden_layers, self.gradient_checkpointing,
                             in_axes=(nn.broadcast, nn.broadcast, nn.broadcast))
        x, _ = layers(self.config, self.dtype, deterministic, name="layer")(x, mask, sin, cos)
        return x


class RoFormerModel(nn.Module):
    config: RoFormerConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: [B, T] ints -> (hidden [B, T, D], the
        word embeddings [V, E] that the MLM decoder is tied to)."""
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embeddings = RoFormerEmbeddings(cfg, self.dtype, name="embeddings")
        x = embeddings(input_ids, token_type_ids, deterministic)
        if cfg.embedding_width != cfg.hidden_size:  # as transformers: the projection only when the widths differ
            x = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "embeddings_project", (None, EMBED))(x)
        mask = attention_mask.astype(bool)[:, None, None, :]  # every query, pads included, sees the non-pad keys
        x = RoFormerEncoder(cfg, self.dtype, self.gradient_checkpointing, name="encoder")(x, mask, deterministic)
        return x, embeddings.word_embeddings.embedding


class RoFormerPredictionHeadTransform(nn.Module):
    config: RoFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, E]: dense, hidden_act, LayerNorm."""
        cfg = self.config
        x = dense(cfg.initializer_range, self.dtype, cfg.embedding_width, "dense", (EMBED, None))(x)
        x = bert.ACT_FNS[cfg.hidden_act](x)
        return layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x)


class RoFormerLMPredictionHead(nn.Module):
    config: RoFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        x = RoFormerPredictionHeadTransform(self.config, self.dtype, name="transform")(x)
        return tied_decoder(self, x, embedding)


class RoFormerOnlyMLMHead(nn.Module):
    """Only a level of names: `cls.predictions`, as the checkpoint has it."""

    config: RoFormerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        return RoFormerLMPredictionHead(self.config, self.dtype, name="predictions")(x, embedding)


class RoFormerForMaskedLM(nn.Module):
    """RoFormer with `cls.predictions.{transform.dense, transform.LayerNorm, bias}`, the decoder tied to the word
    embeddings."""

    config: RoFormerConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "RoFormerForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (the masked tokens, as
        run_mlm_flax.py asks). Dropout needs the "dropout" rng when not deterministic."""
        body = RoFormerModel(self.config, self.dtype, self.gradient_checkpointing, name="roformer")
        hidden, embedding = body(input_ids, attention_mask, token_type_ids, deterministic)
        return RoFormerOnlyMLMHead(self.config, self.dtype, name="cls")(bert.at_positions(hidden, positions), embedding)


class RoFormerForSequenceClassification(nn.Module):
    """RoFormer with `classifier.{dense,out_proj}` on the first token: dropout, dense, hidden_act, dropout,
    out_proj."""

    config: RoFormerConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "RoFormerForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32."""
        cfg = self.config
        body = RoFormerModel(cfg, self.dtype, self.gradient_checkpointing, name="roformer")
        hidden, _ = body(input_ids, attention_mask, token_type_ids, deterministic)
        head = bert.RobertaClassificationHead(cfg, self.dtype, activation=bert.ACT_FNS[cfg.hidden_act],
                                              name="classifier")
        return head(hidden, deterministic).astype(jnp.float32)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init and the position
# limit (the sinusoidal table's length) are BERT's.
FAMILY = Family(
    model_types=RoFormerConfig.MODEL_TYPES, config=RoFormerConfig,
    heads={"MaskedLM": RoFormerForMaskedLM, "SequenceClassification": RoFormerForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=bert.FAMILY.max_positions,
    hf=HfRules(
        scanned=("encoder.layer",),
        tied={"cls.predictions.decoder.weight": "roformer.embeddings.word_embeddings.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias"},
        base_prefix={"roformer": "roformer"},
        pretraining_heads=(r"^cls\.",),
        classifier_head=(r"^classifier\.",),
    ),
)

"""DistilBERT encoder with masked-LM and sequence-classification heads, as Flax linen modules.

BERT's post-LayerNorm block under DistilBERT's own names: `distilbert.transformer.layer.{i}.attention.{q_lin,k_lin,
v_lin,out_lin}`, `sa_layer_norm`, `ffn.{lin1,lin2}`, `output_layer_norm`; embeddings are word + position (no token
types), the classifier is `pre_classifier` -> ReLU -> dropout -> `classifier` on the first token, and the MLM head
`vocab_transform` -> activation -> `vocab_layer_norm` -> `vocab_projector` (tied to the word embeddings, its bias
its own). Its config uses
its own field names (dim, n_layers, n_heads, hidden_dim, ...). Layers are stacked by nn.scan as in bert.py, so
`distilbert/transformer/layer/attention/q_lin/kernel` is [L, D, D].

Shapes: B batch, T length, D dim, N n_heads, H head size, F hidden_dim, V vocab_size, K masked positions.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models import bert
from flaxtrain.models.attention import attention, padding_structure
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import TiedDecoder, dense, layer_norm
from flaxtrain.models.partitioning import CLASSES, EMBED, HEADS, MLP, POSITIONS, embedding_init
from flaxtrain.models.stack import scan_layers


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """The fields of a Hugging Face DistilBERT `config.json` that the model uses (defaults: distilbert-base)."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = 0
    model_type: str = "distilbert"
    num_labels: int = 2
    seq_classif_dropout: float = 0.2  # the classifier's dropout (BERT's classifier_dropout)
    problem_type: str | None = None

    layer_norm_eps: ClassVar[float] = 1e-12  # fixed in transformers' DistilBERT, not a config field

    def __post_init__(self):
        if self.model_type != "distilbert":
            raise ValueError(f"model_type {self.model_type!r} is not 'distilbert'")
        if self.activation not in ACT_FNS:
            raise ValueError(f"activation {self.activation!r} is not supported; supported: {sorted(ACT_FNS)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of {self.n_heads} heads")
        if self.sinusoidal_pos_embds:
            # transformers initialises (and, depending on its version, freezes) a sinusoidal position table;
            # we have neither, and a fine-tuned table would silently stop being sinusoidal.
            raise ValueError("distilbert config has unsupported settings: sinusoidal_pos_embds=True (only learned "
                             "position embeddings are supported)")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "DistilBertConfig":
        """From a transformers `DistilBertConfig`; raises ValueError on features this model lacks."""
        if not getattr(hf_config, "tie_word_embeddings", True):  # our MLM head has no vocab_projector.weight
            raise ValueError("distilbert config has unsupported settings: tie_word_embeddings=False")
        values = {f.name: getattr(hf_config, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    # transformers' attribute_map names, for code that reads any encoder's config.
    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class Embeddings(nn.Module):
    """setup, not compact: the MLM head reads `word_embeddings` (see DistilBertModel.word_embedding_matrix)."""

    config: DistilBertConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.dim, dtype=self.dtype, param_dtype=jnp.float32,
                                        embedding_init=embedding_init(cfg.initializer_range))
        self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.dim, dtype=self.dtype,
                                            param_dtype=jnp.float32,
                                            embedding_init=embedding_init(cfg.initializer_range, (POSITIONS, EMBED)))
        self.LayerNorm = layer_norm(cfg.layer_norm_eps, self.dtype, None)
        self.dropout = Dropout(cfg.dropout)

    def __call__(self, input_ids, deterministic: bool):
        """[B, T] ids -> [B, T, D]: word + position embeddings, LayerNorm, dropout."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(input_ids.shape[1]))[None]
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
    config: DistilBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] bool (True = attend to this key) -> [B, T, D]; no dropout after out_lin."""
        cfg = self.config
        split = lambda y: y.reshape(*y.shape[:2], cfg.n_heads, cfg.head_dim)  # noqa: E731
        q, k, v = (split(dense(cfg.initializer_range, self.dtype, cfg.dim, name, (EMBED, HEADS))(x))
                   for name in ("q_lin", "k_lin", "v_lin"))
        out = attention(q, k, v, mask, dropout_rate=cfg.attention_dropout, deterministic=deterministic,
                        structure=padding_structure(mask))
        out = out.reshape(*x.shape[:2], cfg.dim)
        return dense(cfg.initializer_range, self.dtype, cfg.dim, "out_lin", (HEADS, EMBED))(out)


class FFN(nn.Module):
    config: DistilBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        """[B, T, D] -> [B, T, D]: lin1 [D, F], activation, lin2 [F, D], dropout."""
        cfg = self.config
        x = ACT_FNS[cfg.activation](dense(cfg.initializer_range, self.dtype, cfg.hidden_dim, "lin1", (EMBED, MLP))(x))
        x = dense(cfg.initializer_range, self.dtype, cfg.dim, "lin2", (MLP, EMBED))(x)
        return Dropout(cfg.dropout)(x, deterministic=deterministic)


class TransformerBlock(nn.Module):
    """One post-LayerNorm block; `deterministic` is an attribute and `(carry, None)` the signature, for nn.scan."""

    config: DistilBertConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        h = MultiHeadSelfAttention(self.config, self.dtype, name="attention")(x, mask, self.deterministic)
        x = layer_norm(self.config.layer_norm_eps, self.dtype, "sa_layer_norm")(h + x)
        h = FFN(self.config, self.dtype, name="ffn")(x, self.deterministic)
        return layer_norm(self.config.layer_norm_eps, self.dtype, "output_layer_norm")(h + x), None


class Transformer(nn.Module):
    config: DistilBertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] -> [B, T, D]; params of `layer` are stacked [L, ...]."""
        layers = scan_layers(TransformerBlock, self.config.n_layers, self.gradient_checkpointing)
        x, _ = layers(self.config, self.dtype, deterministic, name="layer")(x, mask)
        return x


class DistilBertModel(nn.Module):
    """The body: `embeddings` and `transformer`."""

    config: DistilBertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        self.embeddings = Embeddings(self.config, self.dtype)
        self.transformer = Transformer(self.config, self.dtype, self.gradient_checkpointing)

    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad): [B, T] ints -> hidden [B, T, D]."""
        x = self.embeddings(input_ids, deterministic)
        mask = attention_mask.astype(bool)[:, None, None, :]  # every query, pads included, sees the non-pad keys
        return self.transformer(x, mask, deterministic)

    def word_embedding_matrix(self):
        """[V, D] float32: the MLM decoder's weights (tied to the input embeddings)."""
        return self.embeddings.word_embeddings.embedding


class DistilBertForMaskedLM(nn.Module):
    """DistilBERT with `vocab_transform` -> activation -> `vocab_layer_norm` -> `vocab_projector` (tied)."""

    config: DistilBertConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "DistilBertForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (as
        bert.BertForMaskedLM); token_type_ids is ignored (DistilBERT has none)."""
        cfg = self.config
        body = DistilBertModel(cfg, self.dtype, self.gradient_checkpointing, name="distilbert")
        hidden = bert.at_positions(body(input_ids, attention_mask, deterministic), positions)
        # The activation is the config's (BERT's and RoBERTa's heads have their own fixed ones).
        x = ACT_FNS[cfg.activation](dense(cfg.initializer_range, self.dtype, cfg.dim, "vocab_transform")(hidden))
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "vocab_layer_norm")(x)
        return TiedDecoder(name="vocab_projector")(x, body.word_embedding_matrix())


class DistilBertForSequenceClassification(nn.Module):
    """DistilBERT with `pre_classifier` -> ReLU -> dropout(seq_classif_dropout) -> `classifier` on the first token."""

    config: DistilBertConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "DistilBertForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32; token_type_ids is ignored (DistilBERT has none)."""
        cfg = self.config
        hidden = DistilBertModel(cfg, self.dtype, self.gradient_checkpointing, name="distilbert")(
            input_ids, attention_mask, deterministic)
        x = jax.nn.relu(dense(cfg.initializer_range, self.dtype, cfg.dim, "pre_classifier")(hidden[:, 0]))
        x = Dropout(cfg.seq_classif_dropout)(x, deterministic=deterministic)
        logits = dense(cfg.initializer_range, self.dtype, cfg.num_labels, "classifier", (EMBED, CLASSES))(x)
        return logits.astype(jnp.float32)


def max_positions(config: DistilBertConfig) -> int:
    """The longest input the position embeddings cover."""
    return config.max_position_embeddings


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py); BERT's init (the same
# forward signature and normal(initializer_range) weights).
FAMILY = Family(
    model_types=("distilbert",), config=DistilBertConfig,
    heads={"MaskedLM": DistilBertForMaskedLM, "SequenceClassification": DistilBertForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("transformer.layer",),
        tied={"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"},
        base_prefix={"distilbert": "distilbert"},
        pretraining_heads=(r"^vocab_transform\.", r"^vocab_layer_norm\.", r"^vocab_projector\."),
        classifier_head=(r"^pre_classifier\.", r"^classifier\."),
    ),
)

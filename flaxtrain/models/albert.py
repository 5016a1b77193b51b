"""ALBERT encoder with masked-LM and sequence-classification heads, as Flax linen modules.

ALBERT is BERT with two savings. Its embeddings have their own width E (embedding_size, 128 in every released
model), mapped up to D by `encoder.embedding_hidden_mapping_in`, and its MLM head maps D back down to E before the
tied decoder. And one set of layer weights serves every layer: the encoder applies the same layer num_hidden_layers
times. The released models all have num_hidden_groups = inner_group_num = 1 (one group of one layer), the only case
implemented here; the checkpoint keys that layer as `albert.encoder.albert_layer_groups.0.albert_layers.0`, our
params as `albert/encoder/shared_layer` (the `renamed` rule below).

The shared layer is applied by nn.scan with its params broadcast, not stacked: compile time does not grow with depth,
the params have no layer axis, and their gradient is the sum over the repetitions.

Shapes: B batch, T length, D hidden_size, E embedding_size, V vocab_size, L num_hidden_layers.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from flaxtrain.models import bert
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import dense, layer_norm, tied_decoder
from flaxtrain.models.partitioning import CLASSES, EMBED, HEADS, MLP
from flaxtrain.parallel import split_batch


@dataclasses.dataclass(frozen=True)
class AlbertConfig(bert.BertConfig):
    """A Hugging Face ALBERT `config.json`'s fields: BERT's plus embedding_size, the layer sharing and the
    classifier's dropout (defaults: albert-base-v2)."""

    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    classifier_dropout_prob: float = 0.1
    model_type: str = "albert"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("albert",)

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_hidden_groups", "inner_group_num"):
            if getattr(self, name) != 1:
                raise ValueError(f"ALBERT config has {name}={getattr(self, name)}: only 1 is supported (one shared "
                                 "layer, as every released ALBERT)")


class AlbertAttention(nn.Module):
    """Self-attention with its output projection and post-LayerNorm in one module, as ALBERT's checkpoint keys
    have it: `attention.{query,key,value,dense,LayerNorm}`."""

    config: AlbertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] bool (True = attend to this key) -> [B, T, D]."""
        cfg = self.config
        h = bert.self_attention(cfg, self.dtype, x, mask, deterministic)  # BERT's, its params `query`, `key`, `value`
        h = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "dense", (HEADS, EMBED))(h)
        h = Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x + h)


class AlbertLayer(nn.Module):
    """The shared block: attention, then ffn -> activation -> ffn_output, full_layer_layer_norm(+ residual).
    `deterministic` is an attribute and `(carry, None)` the signature, for nn.scan and nn.remat (see BertLayer)."""

    config: AlbertConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        x = AlbertAttention(cfg, self.dtype, name="attention")(split_batch(x), mask, self.deterministic)
        h = dense(cfg.initializer_range, self.dtype, cfg.intermediate_size, "ffn", (EMBED, MLP))(x)
        h = bert.ACT_FNS[cfg.hidden_act](h)
        h = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "ffn_output", (MLP, EMBED))(h)
        # transformers' AlbertLayer has a dropout module but never applies it to the ffn output.
        return layer_norm(cfg.layer_norm_eps, self.dtype, "full_layer_layer_norm")(x + h), None


class AlbertTransformer(nn.Module):
    config: AlbertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, E] embeddings, mask [B, 1, 1, T] -> [B, T, D]: mapped up to D, then the one shared layer
        applied num_hidden_layers times (each time with its own dropout rng)."""
        cfg = self.config
        x = dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "embedding_hidden_mapping_in", (None, EMBED))(x)
        layer = nn.remat(AlbertLayer, prevent_cse=False) if self.gradient_checkpointing else AlbertLayer
        shared = nn.scan(layer, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                         in_axes=(nn.broadcast,), length=cfg.num_hidden_layers)
        x, _ = shared(cfg, self.dtype, deterministic, name="shared_layer")(x, mask)
        return x


class AlbertModel(nn.Module):
    """Embeddings (BERT's, E wide), the shared-layer encoder and, for the classifier, the pooler: a Dense called
    `pooler` (tanh of it on the first token)."""

    config: AlbertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    add_pooling_layer: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: [B, T] ints
        -> (hidden [B, T, D], pooled [B, D] or None, the word embeddings [V, E] that the MLM decoder is tied to)."""
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embeddings = bert.BertEmbeddings(cfg, self.dtype, features=cfg.embedding_size, name="embeddings")
        x = embeddings(input_ids, token_type_ids, deterministic)
        mask = attention_mask.astype(bool)[:, None, None, :]  # every query, pads included, sees the non-pad keys
        x = AlbertTransformer(cfg, self.dtype, self.gradient_checkpointing, name="encoder")(x, mask, deterministic)
        pooled = None
        if self.add_pooling_layer:
            pooled = jnp.tanh(dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "pooler")(x[:, 0]))
        return x, pooled, embeddings.word_embeddings.embedding


class AlbertMLMHead(nn.Module):
    """`predictions.{dense, LayerNorm, bias}`: dense D -> E, hidden_act, LayerNorm, then the decoder tied to the
    [V, E] word embeddings."""

    config: AlbertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        cfg = self.config
        x = dense(cfg.initializer_range, self.dtype, cfg.embedding_size, "dense", (EMBED, None))(x)
        x = bert.ACT_FNS[cfg.hidden_act](x)
        return tied_decoder(self, layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x), embedding)


class AlbertForMaskedLM(nn.Module):
    config: AlbertConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "AlbertForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (the masked tokens, as
        run_mlm_flax.py asks). Dropout needs the "dropout" rng when not deterministic."""
        body = AlbertModel(self.config, self.dtype, self.gradient_checkpointing, name="albert")
        hidden, _, embedding = body(input_ids, attention_mask, token_type_ids, deterministic)
        head = AlbertMLMHead(self.config, self.dtype, name="predictions")
        return head(bert.at_positions(hidden, positions), embedding)


class AlbertForSequenceClassification(nn.Module):
    """The pooler, dropout (classifier_dropout_prob) and `classifier`."""

    config: AlbertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "AlbertForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32."""
        cfg = self.config
        body = AlbertModel(cfg, self.dtype, self.gradient_checkpointing, add_pooling_layer=True, name="albert")
        _, pooled, _ = body(input_ids, attention_mask, token_type_ids, deterministic)
        pooled = Dropout(cfg.classifier_dropout_prob)(pooled, deterministic=deterministic)
        logits = dense(cfg.initializer_range, self.dtype, cfg.num_labels, "classifier", (EMBED, CLASSES))(pooled)
        return logits.astype(jnp.float32)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init and the position
# limit are BERT's.
FAMILY = Family(
    model_types=AlbertConfig.MODEL_TYPES, config=AlbertConfig,
    heads={"MaskedLM": AlbertForMaskedLM, "SequenceClassification": AlbertForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=bert.FAMILY.max_positions,
    hf=HfRules(
        renamed={"albert.encoder.shared_layer": "albert.encoder.albert_layer_groups.0.albert_layers.0"},
        tied={"predictions.decoder.weight": "albert.embeddings.word_embeddings.weight",
              "predictions.decoder.bias": "predictions.bias"},
        base_prefix={"albert": "albert"},
        # Hub checkpoints are AlbertForPreTraining: the MLM head, the sentence-order head and the pooler it trains.
        pretraining_heads=(r"^predictions\.", r"^sop_classifier\.", r"^albert\.pooler\."),
        # The pooler is loaded when the checkpoint has it (as transformers does), fresh otherwise.
        classifier_head=(r"^classifier\.", r"^albert\.pooler\."),
    ),
)

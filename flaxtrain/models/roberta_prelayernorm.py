"""RoBERTa-PreLayerNorm (fairseq's pre-LN RoBERTa, e.g. andreasmadsen/efficient_mlm_m0.40) with masked-LM and
sequence-classification heads, as Flax linen modules.

RoBERTa (`flaxtrain.models.bert`: its embeddings, attention, heads and position ids) with the layer norms moved, as
transformers' modeling_roberta_prelayernorm.py has them:
    x = x + dropout(attention.output.dense(attention.self(attention.LayerNorm(x))))
    x = x + dropout(output.dense(act(intermediate.dense(intermediate.LayerNorm(x)))))
and a final `roberta_prelayernorm.LayerNorm` after the last layer. The embeddings keep their LayerNorm (applied, as in
RoBERTa). The body's params live under `roberta_prelayernorm`; the heads are RoBERTa's `lm_head` and
`classifier.{dense,out_proj}`.

Shapes: B batch, T length, D hidden_size, V vocab_size, K masked positions, L layers.
"""

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from flaxtrain.models import bert
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import dense, layer_norm
from flaxtrain.models.partitioning import EMBED, HEADS, MLP
from flaxtrain.models.stack import scan_layers

_BODY = "roberta_prelayernorm"  # transformers' base_model_prefix


@dataclasses.dataclass(frozen=True)
class RobertaPreLayerNormConfig(bert.BertConfig):
    """A Hugging Face RoBERTa-PreLayerNorm `config.json`'s fields: BERT's (defaults: transformers')."""

    vocab_size: int = 50265
    pad_token_id: int = 1
    model_type: str = "roberta-prelayernorm"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("roberta-prelayernorm",)


class ResidualOutput(nn.Module):
    """dense -> dropout -> + residual, with no LayerNorm after (the next sublayer's comes before it)."""

    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32
    inner: str = HEADS  # the logical name of the input width: HEADS after attention, MLP after the MLP

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        x = dense(self.config.initializer_range, self.dtype, self.config.hidden_size, "dense", (self.inner, EMBED))(x)
        return Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic) + residual


class PreLayerNormAttention(nn.Module):
    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] -> [B, T, D]: params `LayerNorm`, `self.{query,key,value}`,
        `output.dense`."""
        h = layer_norm(self.config.layer_norm_eps, self.dtype, "LayerNorm")(x)
        h = bert.BertSelfAttention(self.config, self.dtype, name="self")(h, mask, deterministic)
        return ResidualOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class PreLayerNormIntermediate(nn.Module):
    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, T, F]: LayerNorm, dense, activation."""
        cfg = self.config
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x)
        x = dense(cfg.initializer_range, self.dtype, cfg.intermediate_size, "dense", (EMBED, MLP))(x)
        return ACT_FNS[cfg.hidden_act](x)


class PreLayerNormLayer(nn.Module):
    """One pre-LN block; `deterministic` is an attribute and `(carry, None)` the signature, for nn.scan."""

    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        x = PreLayerNormAttention(self.config, self.dtype, name="attention")(x, mask, self.deterministic)
        h = PreLayerNormIntermediate(self.config, self.dtype, name="intermediate")(x)
        return ResidualOutput(self.config, self.dtype, MLP, name="output")(h, x, self.deterministic), None


class PreLayerNormEncoder(nn.Module):
    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] -> [B, T, D]; params of `layer` are stacked [L, ...]."""
        layers = scan_layers(PreLayerNormLayer, self.config.num_hidden_layers, self.gradient_checkpointing)
        x, _ = layers(self.config, self.dtype, deterministic, name="layer")(x, mask)
        return x


class RobertaPreLayerNormModel(nn.Module):
    """The body: `embeddings` (RoBERTa's), `encoder`, and the final `LayerNorm`. transformers' pooler is left out:
    neither head here uses it (both build the body with add_pooling_layer=False)."""

    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        self.embeddings = bert.BertEmbeddings(self.config, self.dtype)
        self.encoder = PreLayerNormEncoder(self.config, self.dtype, self.gradient_checkpointing)
        self.LayerNorm = layer_norm(self.config.layer_norm_eps, self.dtype, None)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: [B, T] ints -> hidden [B, T, D]."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        mask = attention_mask.astype(bool)[:, None, None, :]  # every query, pads included, sees the non-pad keys
        return self.LayerNorm(self.encoder(x, mask, deterministic))

    def word_embedding_matrix(self):
        """[V, D] float32: the MLM decoder's weights (tied to the input embeddings)."""
        return self.embeddings.word_embeddings.embedding


class RobertaPreLayerNormForMaskedLM(nn.Module):
    """The body with RoBERTa's `lm_head` (dense, gelu, layer_norm, the tied decoder and its bias)."""

    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "RobertaPreLayerNormForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (as
        bert.BertForMaskedLM). Dropout needs the "dropout" rng when not deterministic."""
        cfg = self.config
        body = RobertaPreLayerNormModel(cfg, self.dtype, self.gradient_checkpointing, name=_BODY)
        hidden = bert.at_positions(body(input_ids, attention_mask, token_type_ids, deterministic), positions)
        return bert.RobertaLMHead(cfg, self.dtype, name="lm_head")(hidden, body.word_embedding_matrix())


class RobertaPreLayerNormForSequenceClassification(nn.Module):
    """The body with RoBERTa's `classifier.{dense,out_proj}` on the <s> token."""

    config: RobertaPreLayerNormConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "RobertaPreLayerNormForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32."""
        cfg = self.config
        hidden = RobertaPreLayerNormModel(cfg, self.dtype, self.gradient_checkpointing, name=_BODY)(
            input_ids, attention_mask, token_type_ids, deterministic)
        return bert.RobertaClassificationHead(cfg, self.dtype, name="classifier")(hidden, deterministic).astype(
            jnp.float32)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py); BERT's init and position
# limit (RoBERTa's, through config.is_roberta).
FAMILY = Family(
    model_types=RobertaPreLayerNormConfig.MODEL_TYPES, config=RobertaPreLayerNormConfig,
    heads={"MaskedLM": RobertaPreLayerNormForMaskedLM,
           "SequenceClassification": RobertaPreLayerNormForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=bert.FAMILY.max_positions,
    hf=HfRules(
        scanned=bert.FAMILY.hf.scanned,
        tied={"lm_head.decoder.weight": f"{_BODY}.embeddings.word_embeddings.weight",
              "lm_head.decoder.bias": "lm_head.bias"},
        base_prefix={"roberta-prelayernorm": _BODY},
        # The bare model (AutoModel) carries a pooler that no head here has.
        pretraining_heads=(r"^lm_head\.", rf"^{_BODY}\.pooler\."),
        classifier_head=(r"^classifier\.",),
    ),
)

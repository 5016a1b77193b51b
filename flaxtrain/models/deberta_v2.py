"""DeBERTa-v2 and DeBERTa-v3 encoders with masked-LM and sequence-classification heads, as Flax linen modules
(transformers 5's `modeling_deberta_v2.py`).

BERT's post-LayerNorm block (bert.py's BertOutput and BertIntermediate, under the same names) with disentangled
attention: besides content-to-content q·k, a query attends to the relative position of each key (c2p: q_i ·
Kr[δ(i, j)]) and a key to the relative position of the query (p2c: k_j · Qr[δ'(i, j)]), where Kr and Qr are the
relative embeddings `encoder.rel_embeddings` [2P, D] (LayerNormed by `encoder.LayerNorm` when norm_rel_ebd says
"layer_norm") projected by the layer's own key_proj / query_proj (share_att_key) or pos_key_proj / pos_query_proj.
Distances are log-bucketed past position_buckets / 2 (make_log_bucket_position) and clipped to [0, 2P). All three
terms are divided by sqrt(H * (1 + number of pos_att_type terms)). DeBERTa-v3 has no absolute positions
(position_biased_input False) and no token types (type_vocab_size 0).

The MLM head is transformers' choice by `legacy` (default True): `cls.predictions.{transform.dense,
transform.LayerNorm, bias}` (BERT's, decoder tied to the word embeddings) or `lm_predictions.lm_head.{dense, LayerNorm,
bias}` (the same computation under DeBERTa's own names). The classifier is `pooler.dense` (ContextPooler on the first
token) and `classifier`.

Shapes: B batch, T length, D hidden_size, E embedding_size, N heads, H head size, V vocab_size, P the relative
position span (position_buckets, or max_relative_positions without buckets).
"""

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import bert
from flaxtrain.models.attention import attention
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import dense, layer_norm, tied_decoder
from flaxtrain.models.partitioning import (BUCKETS, CLASSES, EMBED, HEADS, MLP, POSITIONS, VOCAB, dense_inits,
                                          embedding_init)
from flaxtrain.models.stack import scan_layers

POS_ATT_TYPES = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config(bert.BertConfig):
    """A Hugging Face DeBERTa-v2 `config.json`'s fields: BERT's plus the relative-attention ones (defaults:
    microsoft/deberta-v3-base)."""

    vocab_size: int = 128100
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    position_buckets: int = 256  # <= 0: no buckets, distances clipped to max_relative_positions
    pos_att_type: tuple[str, ...] = POS_ATT_TYPES
    share_att_key: bool = True
    norm_rel_ebd: str = "layer_norm"
    position_biased_input: bool = False
    embedding_size: int | None = None  # None: hidden_size
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None  # None: hidden_dropout_prob
    legacy: bool = True
    model_type: str = "deberta-v2"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("deberta-v2",)

    def __post_init__(self):
        super().__post_init__()
        if set(self.pos_att_type) - set(POS_ATT_TYPES):
            raise ValueError(f"pos_att_type {list(self.pos_att_type)} is not supported; supported: any of "
                             f"{list(POS_ATT_TYPES)}")
        if set(self.norm_rel_ebd_parts) - {"none", "layer_norm"}:
            raise ValueError(f"norm_rel_ebd {self.norm_rel_ebd!r} is not supported; supported: 'layer_norm', 'none'")
        if self.pooler_hidden_act not in bert.ACT_FNS:
            raise ValueError(f"pooler_hidden_act {self.pooler_hidden_act!r} is not supported; supported: "
                             f"{sorted(bert.ACT_FNS)}")
        if not self.legacy and self.embedding_width != self.hidden_size:
            raise ValueError(f"legacy=False with embedding_size {self.embedding_size} != hidden_size "
                             f"{self.hidden_size}: transformers' lm_predictions head cannot multiply them either")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "DebertaV2Config":
        """From a transformers `DebertaV2Config` (several fields are extra attributes there, read with their
        transformers defaults); raises ValueError naming a setting this model lacks."""
        unsupported = [f"{name}={value!r}" for name, value, ok in [
            ("conv_kernel_size", getattr(hf_config, "conv_kernel_size", 0), lambda v: not v or v <= 0),
            ("pooler_hidden_size", getattr(hf_config, "pooler_hidden_size", hf_config.hidden_size),
             lambda v: v == hf_config.hidden_size),
            ("attention_head_size", getattr(hf_config, "attention_head_size", None),
             lambda v: v in (None, hf_config.hidden_size // hf_config.num_attention_heads)),
            ("tie_word_embeddings", getattr(hf_config, "tie_word_embeddings", True), bool),
            ("is_decoder", getattr(hf_config, "is_decoder", False), lambda v: not v),
        ] if not ok(value)]
        if unsupported:
            raise ValueError(f"deberta-v2 config has unsupported settings: {', '.join(unsupported)}")
        # transformers' defaults of the attributes its config class does not declare.
        values = {"relative_attention": False, "position_buckets": -1, "share_att_key": False, "norm_rel_ebd": "none",
                  "pos_att_type": (), "position_biased_input": True}
        for field in dataclasses.fields(cls):
            if getattr(hf_config, field.name, None) is not None:
                values[field.name] = getattr(hf_config, field.name)
        values["pos_att_type"] = tuple(values["pos_att_type"])
        values["norm_rel_ebd"] = str(values["norm_rel_ebd"])
        return cls(**values)

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def norm_rel_ebd_parts(self) -> list[str]:
        return [x.strip() for x in self.norm_rel_ebd.lower().split("|")]

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def span(self) -> int:
        """P: half the number of relative embeddings."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def scale(self) -> float:
        """sqrt(H * (1 + number of position terms)): every attention term is divided by it."""
        return math.sqrt(self.head_dim * (1 + len(set(self.pos_att_type))))


def log_bucket_position(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' make_log_bucket_position on int distances: within +-bucket_size / 2 as they are, beyond that
    log-spaced up to +-max_position. In float32 as torch, so that the bucket boundaries fall where it puts them."""
    sign = np.sign(relative)
    mid = bucket_size // 2
    abs_pos = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative)).astype(np.float32)
    log_pos = (np.ceil(np.log(abs_pos / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
                       * np.float32(mid - 1)) + mid).astype(np.float32)
    return np.where(abs_pos <= mid, relative, log_pos * sign).astype(np.int64)


def relative_positions(length: int, config: DebertaV2Config) -> np.ndarray:
    """[T, T] int: the (bucketed) relative position i - j of key j seen from query i."""
    relative = np.arange(length)[:, None] - np.arange(length)[None, :]
    if config.position_buckets > 0 and config.max_relative > 0:
        relative = log_bucket_position(relative, config.position_buckets, config.max_relative)
    return relative


class DebertaV2Embeddings(nn.Module):
    """Word (+ absolute position if position_biased_input) (+ token type if type_vocab_size) embeddings,
    `embed_proj` up to D when E != D, LayerNorm, pads zeroed, dropout."""

    config: DebertaV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool):
        """[B, T] ids, segment ids, mask -> (x [B, T, D], word embeddings [V, E])."""
        cfg = self.config

        def embed(num, names, name):
            return nn.Embed(num, cfg.embedding_width, dtype=self.dtype, param_dtype=jnp.float32, name=name,
                            embedding_init=embedding_init(cfg.initializer_range, names))

        words = embed(cfg.vocab_size, (VOCAB, EMBED), "word_embeddings")
        x = words(input_ids)
        if cfg.position_biased_input:
            x = x + embed(cfg.max_position_embeddings, (POSITIONS, EMBED), "position_embeddings")(
                jnp.arange(input_ids.shape[1]))[None]
        if cfg.type_vocab_size > 0:
            x = x + embed(cfg.type_vocab_size, (None, EMBED), "token_type_embeddings")(token_type_ids)
        if cfg.embedding_width != cfg.hidden_size:
            x = nn.Dense(cfg.hidden_size, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="embed_proj",
                         **dense_inits(cfg.initializer_range, (None, EMBED)))(x)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x) * attention_mask[..., None].astype(self.dtype)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic), words.embedding


class DisentangledSelfAttention(nn.Module):
    config: DebertaV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, rel_embeddings, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] bool, rel_embeddings [2P, D] (normed) -> [B, T, D]."""
        cfg = self.config
        split = lambda y: y.reshape(*y.shape[:-1], cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        proj = {name: dense(cfg.initializer_range, self.dtype, cfg.hidden_size, name, (EMBED, HEADS))
                for name in ("query_proj", "key_proj", "value_proj")}
        q, k, v = (split(proj[name](x)) for name in proj)
        bias = None
        if cfg.relative_attention and cfg.pos_att_type:
            rel = Dropout(cfg.hidden_dropout_prob)(rel_embeddings, deterministic=deterministic).astype(self.dtype)
            # Static [T, T] indices (numpy: a remat'd layer's inputs are traced).
            relative, span, rows = relative_positions(x.shape[1], cfg), cfg.span, np.arange(x.shape[1])
            bias = 0.0
            if "c2p" in cfg.pos_att_type:  # q_i · Kr[i - j]
                pos_key = proj["key_proj"] if cfg.share_att_key else dense(
                    cfg.initializer_range, self.dtype, cfg.hidden_size, "pos_key_proj", (EMBED, HEADS))
                scores = jnp.einsum("btnh,rnh->bntr", q, split(pos_key(rel)), preferred_element_type=jnp.float32)
                bias = bias + scores[:, :, rows[:, None], np.clip(relative + span, 0, 2 * span - 1)]
            if "p2c" in cfg.pos_att_type:  # k_j · Qr[-(j - i)], as transformers indexes it
                pos_query = proj["query_proj"] if cfg.share_att_key else dense(
                    cfg.initializer_range, self.dtype, cfg.hidden_size, "pos_query_proj", (EMBED, HEADS))
                scores = jnp.einsum("bsnh,rnh->bnsr", k, split(pos_query(rel)), preferred_element_type=jnp.float32)
                bias = bias + scores[:, :, rows[None, :], np.clip(-relative.T + span, 0, 2 * span - 1)]
            bias = bias / cfg.scale
        out = attention(q, k, v, mask, bias=bias, scale=1 / cfg.scale, dropout_rate=cfg.attention_probs_dropout_prob,
                        deterministic=deterministic)
        return out.reshape(*x.shape[:2], cfg.hidden_size)


class DebertaV2Attention(nn.Module):
    config: DebertaV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, rel_embeddings, deterministic: bool):
        h = DisentangledSelfAttention(self.config, self.dtype, name="self")(x, mask, rel_embeddings, deterministic)
        return bert.BertOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class DebertaV2Layer(nn.Module):
    """BERT's block with disentangled attention; `(carry, None)` for nn.scan (see bert.BertLayer)."""

    config: DebertaV2Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, rel_embeddings):
        x = DebertaV2Attention(self.config, self.dtype, name="attention")(x, mask, rel_embeddings, self.deterministic)
        h = bert.BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return bert.BertOutput(self.config, self.dtype, MLP, name="output")(h, x, self.deterministic), None


class DebertaV2Encoder(nn.Module):
    config: DebertaV2Config
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, attention_mask, deterministic: bool):
        """x [B, T, D], attention_mask [B, T] -> [B, T, D]; params of `layer` are stacked [L, ...]."""
        cfg = self.config
        rel_embeddings = jnp.zeros((1, cfg.hidden_size), jnp.float32)
        if cfg.relative_attention:
            rel_embeddings = nn.Embed(2 * cfg.span, cfg.hidden_size, param_dtype=jnp.float32, name="rel_embeddings",
                                      embedding_init=embedding_init(cfg.initializer_range, (BUCKETS, EMBED))).embedding
        if "layer_norm" in cfg.norm_rel_ebd_parts:
            # (transformers has this LayerNorm even without relative attention; then it is never used)
            rel_embeddings = layer_norm(cfg.layer_norm_eps, jnp.float32, "LayerNorm")(rel_embeddings)
        mask = attention_mask.astype(bool)[:, None, None, :]  # pad queries' rows are never read by real tokens
        layers = scan_layers(DebertaV2Layer, cfg.num_hidden_layers, self.gradient_checkpointing,
                             in_axes=(nn.broadcast, nn.broadcast))
        x, _ = layers(cfg, self.dtype, deterministic, name="layer")(x, mask, rel_embeddings)
        return x


class DebertaV2Model(nn.Module):
    config: DebertaV2Config
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] ints -> (hidden [B, T, D], word embeddings [V, E])."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x, words = DebertaV2Embeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, attention_mask, deterministic)
        x = DebertaV2Encoder(self.config, self.dtype, self.gradient_checkpointing, name="encoder")(
            x, attention_mask, deterministic)
        return x, words


class DebertaV2LMHead(nn.Module):
    """`lm_predictions.lm_head` (legacy=False): dense, hidden_act, LayerNorm, tied decoder with its own `bias`."""

    config: DebertaV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        cfg = self.config
        x = bert.ACT_FNS[cfg.hidden_act](dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "dense")(x))
        return tied_decoder(self, layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x), embedding)


class DebertaV2OnlyMLMHead(nn.Module):
    """Only a level of names: `lm_predictions.lm_head`."""

    config: DebertaV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        return DebertaV2LMHead(self.config, self.dtype, name="lm_head")(x, embedding)


class DebertaV2ForMaskedLM(nn.Module):
    """DeBERTa-v2 with the MLM head that transformers builds for its `legacy` setting (see the module docstring)."""

    config: DebertaV2Config
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "DebertaV2ForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (the masked tokens, as
        run_mlm_flax.py asks). Dropout needs the "dropout" rng when not deterministic."""
        cfg = self.config
        body = DebertaV2Model(cfg, self.dtype, self.gradient_checkpointing, name="deberta")
        hidden, words = body(input_ids, attention_mask, token_type_ids, deterministic)
        hidden = bert.at_positions(hidden, positions)
        if cfg.legacy:  # BERT's head; its transform maps D to E
            head = bert.BertOnlyMLMHead(dataclasses.replace(cfg, hidden_size=cfg.embedding_width), self.dtype,
                                        name="cls")
            return head(hidden, words)
        return DebertaV2OnlyMLMHead(cfg, self.dtype, name="lm_predictions")(hidden, words)


class DebertaV2ForSequenceClassification(nn.Module):
    """DeBERTa-v2 with `pooler.dense` (dropout, dense, pooler_hidden_act on the first token), dropout and
    `classifier`."""

    config: DebertaV2Config
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "DebertaV2ForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32."""
        cfg = self.config
        hidden, _ = DebertaV2Model(cfg, self.dtype, self.gradient_checkpointing, name="deberta")(
            input_ids, attention_mask, token_type_ids, deterministic)
        x = Dropout(cfg.pooler_dropout)(hidden[:, 0], deterministic=deterministic)
        x = bert.ACT_FNS[cfg.pooler_hidden_act](_ContextPooler(cfg, self.dtype, name="pooler")(x))
        dropout = cfg.hidden_dropout_prob if cfg.cls_dropout is None else cfg.cls_dropout
        x = Dropout(dropout)(x, deterministic=deterministic)
        logits = dense(cfg.initializer_range, self.dtype, cfg.num_labels, "classifier", (EMBED, CLASSES))(x)
        return logits.astype(jnp.float32)


class _ContextPooler(nn.Module):
    """Only a level of names: `pooler.dense`."""

    config: DebertaV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.config.initializer_range, self.dtype, self.config.hidden_size, "dense")(x)


def max_positions(config: DebertaV2Config) -> int:
    """max_position_embeddings: the absolute table's length, and what the relative buckets were trained to span."""
    return config.max_position_embeddings


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is BERT's.
FAMILY = Family(
    model_types=DebertaV2Config.MODEL_TYPES, config=DebertaV2Config,
    heads={"MaskedLM": DebertaV2ForMaskedLM, "SequenceClassification": DebertaV2ForSequenceClassification},
    init_params=bert.FAMILY.init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("encoder.layer",),
        tied={"cls.predictions.decoder.weight": "deberta.embeddings.word_embeddings.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias"},
        base_prefix={"deberta-v2": "deberta"},
        # transformers' _keys_to_ignore_on_load_unexpected: DeBERTa-v3's replaced-token-detection head, and the
        # absolute positions of checkpoints whose config does not use them.
        ignored=(r"^mask_predictions\.", r"^deberta\.embeddings\.position_embeddings\."),
        pretraining_heads=(r"^cls\.", r"^lm_predictions\."),
        classifier_head=(r"^classifier\.", r"^pooler\."),
    ),
)

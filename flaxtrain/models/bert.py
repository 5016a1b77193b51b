"""BERT and RoBERTa encoders with masked-LM and sequence-classification heads, as Flax linen modules.

Param names copy the transformers PyTorch keys, so checkpoint I/O (`flaxtrain.hf_io`) is a few generic rules:
`bert/encoder/layer/attention/self/query/kernel` [L, D, D] is `bert.encoder.layer.{i}.attention.self.query.weight`
transposed, the layers being stacked on a leading axis by `nn.scan`.

RoBERTa is BERT with three differences: position ids count the non-pad tokens from pad_token_id + 1, the body's
params live under `roberta` instead of `bert`, and its heads are `lm_head` and `classifier.{dense,out_proj}` (on the
<s> token, no pooler) instead of `cls.predictions` and `bert.pooler` + `classifier`. XLM-RoBERTa (model_type
"xlm-roberta") is RoBERTa itself under transformers' `XLMRoberta*` class names, its body under `roberta` too.

Shapes: B batch, T length, D hidden_size, N heads, H head size, V vocab_size, L layers.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models.attention import attention, padding_structure
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import dense, layer_norm, tied_decoder
from flaxtrain.models.partitioning import CLASSES, EMBED, HEADS, MLP, POSITIONS, embedding_init
from flaxtrain.models.stack import scan_layers

ACT_FNS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers' "gelu" is the exact erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
_HF_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}
# {model_type: its body's param prefix (transformers' base_model_prefix)}.
_BODY = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}
# The model types with RoBERTa's (fairseq's) position ids and heads, those of other files included.
ROBERTA_TYPES = ("roberta", "xlm-roberta", "roberta-prelayernorm")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT/RoBERTa `config.json` that the model uses (defaults: bert-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    model_type: str = "bert"
    num_labels: int = 2
    classifier_dropout: float | None = None
    problem_type: str | None = None

    # The model types this class describes (ELECTRA's config subclasses it).
    MODEL_TYPES: ClassVar[tuple[str, ...]] = tuple(_HF_CLASS_PREFIX)

    def __post_init__(self):
        if self.model_type not in self.MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {type(self).__name__}'s "
                             f"{list(self.MODEL_TYPES)}")
        if self.hidden_act not in ACT_FNS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACT_FNS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "BertConfig":
        """From a transformers `BertConfig`/`RobertaConfig`; raises ValueError on features this model lacks."""
        unsupported = [
            name
            for name, bad in [
                ("is_decoder=True", getattr(hf_config, "is_decoder", False)),
                ("add_cross_attention=True", getattr(hf_config, "add_cross_attention", False)),
                ("tie_word_embeddings=False", not getattr(hf_config, "tie_word_embeddings", True)),
                ("position_embedding_type != 'absolute'",
                 getattr(hf_config, "position_embedding_type", "absolute") != "absolute"),
            ]
            if bad
        ]
        if unsupported:
            raise ValueError(f"{hf_config.model_type} config has unsupported settings: {', '.join(unsupported)}")
        values = {f.name: getattr(hf_config, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_roberta(self) -> bool:
        """RoBERTa's position ids, MLM head and classifier (RoBERTa, XLM-RoBERTa, RoBERTa-PreLayerNorm)."""
        return self.model_type in ROBERTA_TYPES


def max_positions(config: BertConfig) -> int:
    """The longest input the position embeddings cover (RoBERTa's positions start after the padding index)."""
    return config.max_position_embeddings - (config.pad_token_id + 1 if config.is_roberta else 0)


def position_ids(input_ids: jax.Array, config: BertConfig) -> jax.Array:
    """[B, T] -> [B, T]: 0..T-1 for BERT; for RoBERTa (fairseq) the non-pad tokens count from pad_token_id + 1
    and pads keep position pad_token_id, as transformers' `create_position_ids_from_input_ids`."""
    if config.is_roberta:
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    features: int | None = None  # the embedding width E when not hidden_size (ELECTRA's embedding_size)

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, features=self.features or cfg.hidden_size, dtype=self.dtype,
                                  param_dtype=jnp.float32)
        self.word_embeddings = embed(cfg.vocab_size, embedding_init=embedding_init(cfg.initializer_range))
        self.position_embeddings = embed(cfg.max_position_embeddings,
                                         embedding_init=embedding_init(cfg.initializer_range, (POSITIONS, EMBED)))
        self.token_type_embeddings = embed(cfg.type_vocab_size,
                                           embedding_init=embedding_init(cfg.initializer_range, (None, EMBED)))
        self.LayerNorm = layer_norm(cfg.layer_norm_eps, self.dtype, None)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        """[B, T] ids, [B, T] segment ids -> [B, T, E] (E = features or D)."""
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids(input_ids, self.config)))
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


def self_attention(config: BertConfig, dtype, x, mask, deterministic: bool):
    """x [B, T, D], mask [B, 1, 1, T] bool (True = attend to this key) -> [B, T, D]: the `query`, `key` and `value`
    projections and the attention over them, before any output projection. Called inside a compact method, whose
    submodules the projections become (BertSelfAttention's, ALBERT's `attention`)."""
    split = lambda y: y.reshape(*y.shape[:2], config.num_attention_heads, config.head_dim)  # noqa: E731
    q, k, v = (split(dense(config.initializer_range, dtype, config.hidden_size, name, (EMBED, HEADS))(x))
               for name in ("query", "key", "value"))
    out = attention(q, k, v, mask, dropout_rate=config.attention_probs_dropout_prob, deterministic=deterministic,
                    structure=padding_structure(mask))
    return out.reshape(*x.shape[:2], config.hidden_size)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] bool (True = attend to this key) -> [B, T, D]."""
        return self_attention(self.config, self.dtype, x, mask, deterministic)


class BertOutput(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual): transformers' `BertSelfOutput` and `BertOutput` alike."""

    config: BertConfig
    dtype: Any = jnp.float32
    inner: str = HEADS  # the logical name of the input width: HEADS after attention, MLP after the MLP

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        x = dense(self.config.initializer_range, self.dtype, self.config.hidden_size, "dense", (self.inner, EMBED))(x)
        x = Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic)
        return layer_norm(self.config.layer_norm_eps, self.dtype, "LayerNorm")(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        h = BertSelfAttention(self.config, self.dtype, name="self")(x, mask, deterministic)
        return BertOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.config.initializer_range, self.dtype, self.config.intermediate_size, "dense", (EMBED, MLP))(x)
        return ACT_FNS[self.config.hidden_act](x)


class BertLayer(nn.Module):
    """One encoder block. `deterministic` is an attribute, not an argument, so that nn.scan and nn.remat see only
    arrays; `(carry, None)` in and out is the signature nn.scan wants."""

    config: BertConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        x = BertAttention(self.config, self.dtype, name="attention")(x, mask, self.deterministic)
        h = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
        return BertOutput(self.config, self.dtype, MLP, name="output")(h, x, self.deterministic), None


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, 1, 1, T] -> [B, T, D]; params of `layer` are stacked [L, ...]."""
        layers = scan_layers(BertLayer, self.config.num_hidden_layers, self.gradient_checkpointing)
        x, _ = layers(self.config, self.dtype, deterministic, name="layer")(x, mask)
        return x


class BertPooler(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """[B, T, D] -> [B, D]: tanh(dense) of the first ([CLS]) token."""
        return jnp.tanh(dense(self.config.initializer_range, self.dtype, self.config.hidden_size, "dense")(x[:, 0]))


class BertModel(nn.Module):
    """The shared body: embeddings, encoder and (BERT classifiers only) the pooler. ELECTRA's embeddings may be
    narrower than hidden_size (embedding_size), then `embeddings_project` maps them up to it."""

    config: BertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    add_pooling_layer: bool = False
    embedding_size: int | None = None

    def setup(self):
        self.embeddings = BertEmbeddings(self.config, self.dtype, features=self.embedding_size)
        if self.embedding_size not in (None, self.config.hidden_size):
            self.embeddings_project = dense(self.config.initializer_range, self.dtype, self.config.hidden_size, None,
                                            (None, EMBED))
        self.encoder = BertEncoder(self.config, self.dtype, self.gradient_checkpointing)
        if self.add_pooling_layer:
            self.pooler = BertPooler(self.config, self.dtype)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: [B, T] ints
        -> (hidden [B, T, D], pooled [B, D] or None)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        if hasattr(self, "embeddings_project"):
            x = self.embeddings_project(x)
        mask = attention_mask.astype(bool)[:, None, None, :]  # every query, pads included, sees the non-pad keys
        x = self.encoder(x, mask, deterministic)
        return x, (self.pooler(x) if self.add_pooling_layer else None)

    def word_embedding_matrix(self):
        """[V, E] float32: the MLM decoder's weights (tied to the input embeddings)."""
        return self.embeddings.word_embeddings.embedding


def at_positions(hidden, positions):
    """hidden [B, T, D] -> [B, K, D] at `positions` [B, K] (the masked tokens, where an MLM head need only run), or
    hidden itself when positions is None."""
    return hidden if positions is None else jnp.take_along_axis(hidden, positions[..., None], axis=1)


class BertPredictionHeadTransform(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.config.initializer_range, self.dtype, self.config.hidden_size, "dense")(x)
        x = ACT_FNS[self.config.hidden_act](x)
        return layer_norm(self.config.layer_norm_eps, self.dtype, "LayerNorm")(x)


class BertLMPredictionHead(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        return tied_decoder(self, BertPredictionHeadTransform(self.config, self.dtype, name="transform")(x), embedding)


class BertOnlyMLMHead(nn.Module):
    """BERT's MLM head: params `cls.predictions.{transform.dense, transform.LayerNorm, bias}`."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        return BertLMPredictionHead(self.config, self.dtype, name="predictions")(x, embedding)


class RobertaLMHead(nn.Module):
    """RoBERTa's MLM head: params `lm_head.{dense, layer_norm, bias}`; always exact gelu, whatever hidden_act says."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):
        x = ACT_FNS["gelu"](dense(self.config.initializer_range, self.dtype, self.config.hidden_size, "dense")(x))
        return tied_decoder(self, layer_norm(self.config.layer_norm_eps, self.dtype, "layer_norm")(x), embedding)


class RobertaClassificationHead(nn.Module):
    """RoBERTa's classifier on the <s> token: dropout, dense, tanh, dropout, out_proj. ELECTRA's is the same with
    gelu for tanh."""

    config: BertConfig
    dtype: Any = jnp.float32
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh

    @nn.compact
    def __call__(self, x, deterministic: bool):
        """[B, T, D] -> [B, num_labels]."""
        cfg = self.config
        dropout = Dropout(_classifier_dropout(cfg), deterministic=deterministic)
        x = self.activation(dense(cfg.initializer_range, self.dtype, cfg.hidden_size, "dense")(dropout(x[:, 0])))
        return dense(cfg.initializer_range, self.dtype, cfg.num_labels, "out_proj", (EMBED, CLASSES))(dropout(x))


def _classifier_dropout(config: BertConfig) -> float:
    return config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout


class BertForMaskedLM(nn.Module):
    """BERT/RoBERTa/XLM-RoBERTa with the MLM head; `config.model_type` picks the variant."""

    config: BertConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return f"{_HF_CLASS_PREFIX[self.config.model_type]}ForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (the masked tokens: the
        loss needs no others, and in a small model the head over the vocabulary is most of the work). Dropout needs
        the "dropout" rng when not deterministic."""
        cfg = self.config
        body = BertModel(cfg, self.dtype, self.gradient_checkpointing, name=_BODY[cfg.model_type])
        hidden, _ = body(input_ids, attention_mask, token_type_ids, deterministic)
        hidden = at_positions(hidden, positions)
        head = RobertaLMHead if cfg.is_roberta else BertOnlyMLMHead
        return head(cfg, self.dtype, name="lm_head" if cfg.is_roberta else "cls")(
            hidden, body.word_embedding_matrix())


class BertForSequenceClassification(nn.Module):
    """BERT (pooler + `classifier`) or RoBERTa/XLM-RoBERTa (`classifier.{dense,out_proj}`) sequence classifier."""

    config: BertConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return f"{_HF_CLASS_PREFIX[self.config.model_type]}ForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32."""
        cfg = self.config
        body = BertModel(cfg, self.dtype, self.gradient_checkpointing, add_pooling_layer=not cfg.is_roberta,
                         name=_BODY[cfg.model_type])
        hidden, pooled = body(input_ids, attention_mask, token_type_ids, deterministic)
        if cfg.is_roberta:
            logits = RobertaClassificationHead(cfg, self.dtype, name="classifier")(hidden, deterministic)
        else:
            pooled = Dropout(_classifier_dropout(cfg))(pooled, deterministic=deterministic)
            logits = dense(cfg.initializer_range, self.dtype, cfg.num_labels, "classifier", (EMBED, CLASSES))(pooled)
        return logits.astype(jnp.float32)


def init_params(module: nn.Module, rng: jax.Array, unbox: bool = True) -> dict:
    """Fresh float32 params of a model above (normal(initializer_range) weights, as transformers). Jitted, so a
    full-size init is fast; under `jax.eval_shape(functools.partial(init_params, module), rng)` it allocates nothing.
    unbox=False keeps flax's LogicallyPartitioned boxes (the logical axis names, for parallel.shardings)."""
    ids = jnp.zeros((1, 2), jnp.int32)  # 2 tokens keep RoBERTa's positions (pad_token_id + 1, + 2) in range
    params = jax.jit(module.init)({"params": rng}, ids, jnp.ones_like(ids))["params"]
    return nn.unbox(params) if unbox else params


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py).
FAMILY = Family(
    model_types=BertConfig.MODEL_TYPES, config=BertConfig,
    heads={"MaskedLM": BertForMaskedLM, "SequenceClassification": BertForSequenceClassification},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("encoder.layer",),
        tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias",
              "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
              "lm_head.decoder.bias": "lm_head.bias"},
        base_prefix=_BODY,
        # Hub pretraining checkpoints carry the MLM head, and BERT's also the NSP head (`cls.seq_relationship`) and
        # pooler.
        pretraining_heads=(r"^cls\.", r"^lm_head\.", r"^(bert|roberta)\.pooler\."),
        # BERT's pooler is trained by NSP, so it is loaded when present (as transformers does) and fresh otherwise.
        classifier_head=(r"^classifier\.", r"^bert\.pooler\."),
    ),
)

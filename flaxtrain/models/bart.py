"""BART and mBART encoder-decoders with the LM head, as Flax linen modules.

Param names copy the transformers PyTorch keys: `model/encoder/layers/self_attn/q_proj/kernel` [L, D, D] is
`model.encoder.layers.{i}.self_attn.q_proj.weight` transposed, the layers being stacked by `nn.scan`. The token
embedding is `model/shared` (the encoder's and decoder's `embed_tokens` and the `lm_head` are copies of it in
PyTorch: the `tied` rule of FAMILY.hf); `final_logits_bias` [1, V] is a buffer in PyTorch, saved with the checkpoint
and never trained. Here it is a param that the forward pass reads through stop_gradient (and training.decay_mask
skips it), so training leaves it as loaded.

mBART is the same model with two switches that `model_type` sets: pre-layer-norm blocks (`normalize_before`) and a
final `layer_norm` after the encoder's and the decoder's last layer (`add_final_layer_norm`). Its checkpoints also
set `scale_embedding` in config.json (BART's may too), which multiplies the token embeddings by sqrt(D) (not the
tied output layer's weights).

Special token ids (`BartConfig` fields, read with getattr): transformers 5 keeps pad/bos/eos/decoder_start/
forced_eos_token_id in the model config, but drops `forced_bos_token_id` (a generation setting) from config.json on
load: it lives in a checkpoint's generation_config.json (e.g. bart-large-cnn's forced_bos_token_id=0, mbart-50's
target language). Pass `GenerationConfig.from_pretrained(...)` to `BartConfig.from_hf` to take those (its non-None
ids win). As transformers' `generate`, a missing decoder_start_token_id (mBART's default) falls back to bos_token_id.

Shapes: B batch, S encoder length, T decoder length, D d_model, N heads, H head size, F ffn dim, V vocab_size,
L layers, P max_position_embeddings.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models import t5
from flaxtrain.models.attention import attention, init_cache, write_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.partitioning import (EMBED, HEADS, MLP, POSITIONS, VOCAB, dense_inits, embedding_init, named,
                                          norm_inits)
from flaxtrain.models.stack import scan_layers

_HF_ARCHITECTURES = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration"}
# Offset of BART's learned positions (fairseq reserved the first two rows): position p reads row p + 2.
POSITION_OFFSET = 2
# Settings of old (transformers 3) BART config.json files that still travel with Hub checkpoints, and the values
# this model (and transformers 5, which ignores them) implements; normalize_before and add_final_layer_norm are
# the mBART switches, checked against model_type.
_LEGACY_SETTINGS = {"add_bias_logits": False, "normalize_embedding": True, "static_position_embeddings": False,
                    "extra_pos_embeddings": POSITION_OFFSET}


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """The fields of a Hugging Face BART/mBART `config.json` that the model uses (defaults: bart-large).
    normalize_before and add_final_layer_norm (None: True for mBART, False for BART) are mBART's block layout."""

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    decoder_start_token_id: int | None = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = "bart"
    normalize_before: bool | None = None
    add_final_layer_norm: bool | None = None
    layer_norm_eps: float = 1e-5  # not in config.json: torch.nn.LayerNorm's default, which BART uses

    def __post_init__(self):
        if self.model_type not in _HF_ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not BART-like; expected {list(_HF_ARCHITECTURES)}")
        for name in ("normalize_before", "add_final_layer_norm"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.model_type == "mbart")
        for name in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.decoder_start_token_id is None:  # as transformers' generate: mBART starts from bos
            object.__setattr__(self, "decoder_start_token_id", self.bos_token_id)
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not a multiple of {heads} heads")

    @classmethod
    def from_hf(cls, hf_config: Any, generation_config: Any = None) -> "BartConfig":
        """From a transformers `BartConfig`/`MBartConfig` (and optionally a `GenerationConfig`, whose special token
        ids then win); raises ValueError on settings this model lacks."""
        model_type = hf_config.model_type
        if model_type not in _HF_ARCHITECTURES:
            raise ValueError(f"{model_type} is not a BART or mBART config")
        is_mbart = model_type == "mbart"
        checks = [
            ("is_decoder=True", getattr(hf_config, "is_decoder", False)),
            ("is_encoder_decoder=False", not getattr(hf_config, "is_encoder_decoder", True)),
            ("tie_word_embeddings=False", not getattr(hf_config, "tie_word_embeddings", True)),
            ("encoder_layerdrop > 0", getattr(hf_config, "encoder_layerdrop", 0) or 0),
            ("decoder_layerdrop > 0", getattr(hf_config, "decoder_layerdrop", 0) or 0),
            ("pad_token_id=None", getattr(hf_config, "pad_token_id", None) is None),
            *((f"{name}={getattr(hf_config, name, value)!r}", getattr(hf_config, name, value) != value)
              for name, value in _LEGACY_SETTINGS.items()),
            *((f"{name}={getattr(hf_config, name, is_mbart)!r} with model_type {model_type!r}",
               getattr(hf_config, name, is_mbart) != is_mbart)
              for name in ("normalize_before", "add_final_layer_norm")),
        ]
        unsupported = [name for name, bad in checks if bad]
        if unsupported:
            raise ValueError(f"{model_type} config has unsupported settings: {', '.join(unsupported)}")
        values = {f.name: getattr(hf_config, f.name, None) for f in dataclasses.fields(cls)}
        values.update(normalize_before=is_mbart, add_final_layer_norm=is_mbart)
        # Keyword arguments, not defaults: a token id that is None in the config stays None.
        token_ids = ("bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                     "forced_eos_token_id")
        for name in token_ids:
            if generation_config is not None and getattr(generation_config, name, None) is not None:
                values[name] = getattr(generation_config, name)
        return cls(**{name: value for name, value in values.items() if value is not None or name in token_ids})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads


def max_positions(config: BartConfig) -> int:
    """The longest encoder (or decoder) input the learned positions cover; the table has 2 more rows (offset)."""
    return config.max_position_embeddings


def shift_tokens_right(labels, pad_token_id: int, decoder_start_token_id: int):
    """labels [B, T] -> decoder_input_ids [B, T]: decoder_start_token_id, then labels[:, :-1]; -100 becomes
    pad_token_id. NumPy in, NumPy out; jax in, jax out. (transformers' BART helper and argument order; mBART's own
    helper, which starts from each row's last non-pad token, the language id, is not this.)"""
    return t5.shift_right(labels, decoder_start_token_id, pad_token_id)


def _dense(config: BartConfig, dtype, features: int, name: str, axes: tuple) -> nn.Dense:
    """A Dense layer whose kernel [in, out] has the logical axis names `axes` (see models/partitioning.py)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name, **dense_inits(config.init_std, axes))


def _layer_norm(config: BartConfig, dtype, name: str) -> nn.LayerNorm:
    # Statistics in float32 (flax upcasts); the two-pass variance matches torch on large residual streams.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name, **norm_inits())


def _token_embedding_init(std: float, pad_token_id: int):
    """normal(std) with the pad row zeroed, as transformers initialises an nn.Embedding with padding_idx."""
    def init(rng, shape, dtype=jnp.float32):
        return nn.initializers.normal(std)(rng, shape, dtype).at[pad_token_id].set(0)
    return init


class BartAttention(nn.Module):
    """Multi-head attention with biased projections and H**-0.5 scaling. `kv` projects keys and values
    (cacheable), `__call__` attends to them. The projections are made in setup, for both methods; __call__ is
    compact because `attention` adds its dropout there."""

    config: BartConfig
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.q_proj, self.k_proj, self.v_proj = (
            _dense(cfg, self.dtype, cfg.d_model, name, (EMBED, HEADS)) for name in ("q_proj", "k_proj", "v_proj"))
        self.out_proj = _dense(cfg, self.dtype, cfg.d_model, "out_proj", (HEADS, EMBED))

    def _split(self, y):
        return y.reshape(*y.shape[:2], self.num_heads, self.config.d_model // self.num_heads)

    def kv(self, source):
        """source [B, S, D] -> (keys, values), each [B, S, N, H]."""
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    @nn.compact
    def __call__(self, x, k, v, mask, deterministic: bool):
        """x [B, T, D]; k, v [B, S, N, H]; mask bool broadcastable to [B, N, T, S] (True = attend) -> [B, T, D]."""
        q = self._split(self.q_proj(x))
        out = attention(q, k, v, mask, dropout_rate=self.config.attention_dropout, deterministic=deterministic)
        return self.out_proj(out.reshape(*x.shape[:2], -1))


class BartLayer(nn.Module):
    """One encoder or decoder layer, as nn.scan wants it: (x, broadcast inputs, per-layer cache) -> (x, cache).
    Each sublayer is x + dropout(f(x)) followed by its layer norm (BART), or preceded by it (mBART)."""

    config: BartConfig
    dtype: Any = jnp.float32
    is_decoder: bool = False
    deterministic: bool = True

    def _residual(self, x, name, fn):
        """Post-norm norm(x + dropout(fn(x))) or pre-norm x + dropout(fn(norm(x))); fn may also return a cache."""
        norm = _layer_norm(self.config, self.dtype, name)
        h, cache = fn(norm(x) if self.config.normalize_before else x)
        x = x + Dropout(self.config.dropout)(h, deterministic=self.deterministic)
        return (x if self.config.normalize_before else norm(x)), cache

    @nn.compact
    def __call__(self, x, mask, encoder_hidden, encoder_mask, index, cache):
        """x [B, T, D]; mask and encoder_mask bool broadcastable to [B, N, T, keys]; encoder_hidden [B, S, D] or
        None (encoder, or cross keys/values in the cache); index: the cache position of x's first token; cache None
        or this layer's {"self": {"key", "value": [B, T_max, N, H]}, "cross": {} or {"key", "value": [B, S, N, H]}}
        -> (x, cache)."""
        cfg, deterministic = self.config, self.deterministic
        heads = cfg.decoder_attention_heads if self.is_decoder else cfg.encoder_attention_heads

        def self_attention(h):
            attn = BartAttention(cfg, heads, self.dtype, name="self_attn")
            k, v = attn.kv(h)
            layer_cache = None
            if cache is not None:  # write this step's keys/values into the preallocated buffers
                layer_cache = write_cache(cache["self"], k, v, index)
                k, v = layer_cache["key"], layer_cache["value"]
            return attn(h, k, v, mask, deterministic), layer_cache

        def cross_attention(h):  # keys/values from the encoder output once, then from the cache
            attn = BartAttention(cfg, heads, self.dtype, name="encoder_attn")
            if cache is not None and "key" in cache["cross"]:
                k, v = cache["cross"]["key"], cache["cross"]["value"]
            else:
                k, v = attn.kv(encoder_hidden)
            return attn(h, k, v, encoder_mask, deterministic), {"key": k, "value": v}

        def feed_forward(h):
            ffn_dim = cfg.decoder_ffn_dim if self.is_decoder else cfg.encoder_ffn_dim
            h = ACT_FNS[cfg.activation_function](_dense(cfg, self.dtype, ffn_dim, "fc1", (EMBED, MLP))(h))
            h = Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
            return _dense(cfg, self.dtype, cfg.d_model, "fc2", (MLP, EMBED))(h), None

        x, self_cache = self._residual(x, "self_attn_layer_norm", self_attention)
        if self.is_decoder:
            x, cross_cache = self._residual(x, "encoder_attn_layer_norm", cross_attention)
        x, _ = self._residual(x, "final_layer_norm", feed_forward)
        return x, (None if cache is None else {"self": self_cache, "cross": cross_cache})


class BartStack(nn.Module):
    """Encoder or decoder: embedded tokens + learned positions, `layernorm_embedding`, dropout, scanned layers,
    (mBART) the final `layer_norm`."""

    config: BartConfig
    dtype: Any = jnp.float32
    is_decoder: bool = False
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask=None, encoder_hidden=None, encoder_mask=None, cache=None, deterministic=True):
        """x [B, T, D] embedded tokens (already scaled); mask [B, T] (1 = token, 0 = pad) or None; encoder_hidden
        [B, S, D] and encoder_mask [B, S] (decoder); cache (decoder, see `BartForConditionalGeneration.init_cache`)
        or None -> (x [B, T, D], updated cache or None)."""
        cfg, length = self.config, x.shape[1]
        if cache is None:
            index, query_pos = None, jnp.arange(length)
            key_pos = query_pos
        else:  # the queries continue at cache["index"]; keys are the whole preallocated buffer
            index = cache["index"]
            query_pos, key_pos = index + jnp.arange(length), jnp.arange(cache["self"]["key"].shape[2])
        positions = nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model, dtype=self.dtype,
                             param_dtype=jnp.float32, embedding_init=embedding_init(cfg.init_std, (POSITIONS, EMBED)),
                             name="embed_positions")
        x = x + positions(query_pos + POSITION_OFFSET)[None]
        dropout = Dropout(cfg.dropout, deterministic=deterministic)
        x = dropout(_layer_norm(cfg, self.dtype, "layernorm_embedding")(x))

        self_mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask.astype(bool)[:, None, None, :]
        if self.is_decoder:
            self_mask = self_mask & (key_pos[None, :] <= query_pos[:, None])[None, None]
        if encoder_mask is not None:
            encoder_mask = encoder_mask.astype(bool)[:, None, None, :]

        layers = scan_layers(BartLayer, cfg.decoder_layers if self.is_decoder else cfg.encoder_layers,
                             self.gradient_checkpointing, in_axes=(nn.broadcast,) * 4 + (0,))
        layer_caches = None if cache is None else {k: v for k, v in cache.items() if k != "index"}
        x, layer_caches = layers(cfg, self.dtype, self.is_decoder, deterministic, name="layers")(
            x, self_mask, encoder_hidden, encoder_mask, index, layer_caches)
        if cfg.add_final_layer_norm:
            x = _layer_norm(cfg, self.dtype, "layer_norm")(x)
        return x, (None if cache is None else {"index": index + length, **layer_caches})


class BartModel(nn.Module):
    """The body (`model.` in the checkpoints): the shared token embedding, the encoder and the decoder."""

    config: BartConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        cfg = self.config
        init = named(_token_embedding_init(cfg.init_std, cfg.pad_token_id), VOCAB, EMBED)
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                               embedding_init=init)
        self.encoder = BartStack(cfg, self.dtype, False, self.gradient_checkpointing)
        self.decoder = BartStack(cfg, self.dtype, True, self.gradient_checkpointing)

    def _embed(self, ids):
        """[B, T] -> [B, T, D]; scale_embedding (mBART) multiplies by sqrt(D)."""
        x = self.shared(ids)
        return x * self.config.d_model**0.5 if self.config.scale_embedding else x

    def encode(self, input_ids, attention_mask, deterministic: bool):
        return self.encoder(self._embed(input_ids), attention_mask, deterministic=deterministic)[0]

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, cache,
               deterministic: bool):
        return self.decoder(self._embed(decoder_input_ids), decoder_attention_mask, encoder_hidden, attention_mask,
                            cache, deterministic)

    def output_embedding(self):
        """[V, D] float32: the LM head's weights (tied to `shared`, unscaled)."""
        return self.shared.embedding


def _check_length(config: BartConfig, length: int, what: str):
    if length > max_positions(config):
        raise ValueError(f"{what} of {length} tokens is longer than the {max_positions(config)} learned positions "
                         "(max_position_embeddings)")


class BartForConditionalGeneration(nn.Module):
    """BART / mBART with the LM head (tied to `model.shared`, plus `final_logits_bias`). `encode`, `decode` and
    `init_cache` (through `apply(..., method=...)`, except init_cache which needs no params) let generation run
    the encoder once and decode with a KV cache, as `flaxtrain.models.t5.T5ForConditionalGeneration`."""

    config: BartConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return _HF_ARCHITECTURES[self.config.model_type]

    def setup(self):
        self.model = BartModel(self.config, self.dtype, self.gradient_checkpointing)
        self.final_logits_bias = self.param("final_logits_bias", named(nn.initializers.zeros, None, VOCAB),
                                            (1, self.config.vocab_size), jnp.float32)

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 deterministic: bool = True):
        """input_ids, attention_mask [B, S]; decoder_input_ids, decoder_attention_mask [B, T] (None: causal only)
        -> logits [B, T, V] float32. Dropout needs the "dropout" rng when not deterministic."""
        encoder_hidden = self.encode(input_ids, attention_mask, deterministic)
        logits, _ = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                                deterministic=deterministic)
        return logits

    def encode(self, input_ids, attention_mask, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad) [B, S] -> encoder output [B, S, D]."""
        _check_length(self.config, input_ids.shape[1], "an encoder input")
        return self.model.encode(input_ids, attention_mask, deterministic)

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask=None, cache=None,
               deterministic: bool = True):
        """decoder_input_ids [B, T]; encoder_hidden [B, S, D]; attention_mask [B, S] of the encoder input
        -> (logits [B, T, V] float32, cache).

        Without a cache: a causal pass over all T tokens at positions 0..T-1 (decoder_attention_mask [B, T] masks
        padded keys). With a cache from `init_cache`: the T tokens continue at position cache["index"]; the first
        call projects the cross-attention keys/values from encoder_hidden into the cache, later calls may pass
        encoder_hidden=None.
        """
        if cache is not None and decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask is not supported with a cache (generation pads nothing)")
        if cache is None:
            _check_length(self.config, decoder_input_ids.shape[1], "a decoder input")
        x, cache = self.model.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                                     cache, deterministic)
        # The matmul runs in the computation dtype with float32 accumulation; logits stay float32 for the loss.
        logits = jnp.einsum("btd,vd->btv", x, self.model.output_embedding().astype(x.dtype),
                            preferred_element_type=jnp.float32)
        return logits + jax.lax.stop_gradient(self.final_logits_bias), cache  # a buffer: never trained

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty decoder cache for up to max_length decoder tokens, in models/attention.py's layout: {"index": 0,
        "self": {"key", "value": [L, B, max_length, N, H]}, "cross": {}}; `decode` fills "cross" with keys/values
        [L, B, S, N, H] on its first call."""
        cfg = self.config
        _check_length(cfg, max_length, "a decoder cache")
        return init_cache(cfg.decoder_layers, batch_size, max_length, cfg.decoder_attention_heads,
                          cfg.decoder_head_dim, self.dtype, encoder_decoder=True)


def init_params(module: nn.Module, rng: jax.Array, unbox: bool = True) -> dict:
    """Fresh float32 params (transformers' BART init: normal(init_std), zero biases, pad embedding row zero).
    Jitted; under `jax.eval_shape(functools.partial(init_params, module), rng)` it allocates nothing. unbox=False
    keeps flax's LogicallyPartitioned boxes (the logical axis names, for parallel.shardings)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.jit(module.init)({"params": rng}, ids, jnp.ones_like(ids), ids)["params"]
    return nn.unbox(params) if unbox else params


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). BART's shift is T5's
# (shift_tokens_right above is the same with transformers' argument order).
FAMILY = Family(
    model_types=tuple(_HF_ARCHITECTURES), config=BartConfig, heads={"Seq2SeqLM": BartForConditionalGeneration},
    init_params=init_params, max_positions=max_positions, shift_right=t5.FAMILY.shift_right,
    hf=HfRules(
        scanned=("encoder.layers", "decoder.layers"),
        tied={"model.encoder.embed_tokens.weight": "model.shared.weight",
              "model.decoder.embed_tokens.weight": "model.shared.weight", "lm_head.weight": "model.shared.weight"},
        # A `BartModel` checkpoint (AutoModel) is the body without the `model.` prefix and without final_logits_bias.
        base_prefix={"bart": "model", "mbart": "model"},
        # fairseq-converted checkpoints carry version buffers (transformers ignores them too).
        ignored=(r"^model\.(encoder|decoder)\.version$",),
        # Absent from BartModel checkpoints: zeros, as transformers initialises the buffer.
        zeros=(r"^final_logits_bias$",),
    ),
)

"""T5 v1.0 and T5 v1.1 / mT5 encoder-decoders with the LM head, as Flax linen modules.

Param names copy the transformers PyTorch keys: `encoder/block/layer/0/SelfAttention/q/kernel` [L, D, N*H] is
`encoder.block.{i}.layer.0.SelfAttention.q.weight` transposed, the blocks being stacked by `nn.scan`. One exception:
transformers keeps the relative position bias in block 0 (`encoder.block.0.layer.0.SelfAttention.
relative_attention_bias`) and hands it to every block; here it is `encoder/relative_attention_bias`, outside the scan,
and the `renamed` rule (FAMILY.hf) maps it.

v1.0 (`feed_forward_proj="relu"`): FFN `wi`, `wo`; the LM head is the shared embedding, applied to the decoder output
rescaled by d_model**-0.5. v1.1 / mT5 (`"gated-gelu"`): FFN gelu_new(`wi_0`) * `wi_1`, then `wo`; a separate `lm_head`,
no rescale. Attention logits are not scaled by H**-0.5 (T5 folds that into the init of `q`).

Shapes: B batch, S encoder length, T decoder length, D d_model, N heads, H d_kv, F d_ff, V vocab_size, L layers.
"""

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.models.attention import attention, init_cache, write_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import LMHead, dense, float32_logits
from flaxtrain.models.llama import RMSNorm
from flaxtrain.models.partitioning import BUCKETS, EMBED, HEADS, MLP, embedding_init
from flaxtrain.models.stack import scan_layers

_HF_ARCHITECTURES = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a Hugging Face T5/mT5 `config.json` that the model uses (defaults: t5-small).
    tie_word_embeddings=True is v1.0's head (shared embedding, rescaled); False a separate `lm_head`."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = tuple(_HF_ARCHITECTURES)  # the types it reads (LongT5Config: its own)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.model_type not in self.MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {list(self.MODEL_TYPES)}")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or self.dense_act_fn not in ACT_FNS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported: expected 'ACT' or "
                             f"'gated-ACT' with ACT one of {sorted(ACT_FNS)}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "T5Config":
        """From a transformers `T5Config`/`MT5Config` (a subclass: its own); raises ValueError on features this
        model lacks."""
        if hf_config.model_type not in cls.MODEL_TYPES:
            raise ValueError(f"{hf_config.model_type} is not a {' or '.join(cls.MODEL_TYPES)} config")
        if getattr(hf_config, "is_decoder", False) or not getattr(hf_config, "is_encoder_decoder", True):
            raise ValueError(f"{hf_config.model_type} config is not an encoder-decoder (is_decoder or "
                             "is_encoder_decoder=False): only the conditional-generation model is supported")
        values = {f.name: getattr(hf_config, f.name, None) for f in dataclasses.fields(cls)}
        # transformers 5 forces tie_word_embeddings=True for the T5 family and keeps the original meaning for T5 in
        # scale_decoder_outputs; its MT5 never rescales, and mT5 checkpoints hold their own lm_head.
        if hf_config.model_type == "mt5":
            values["tie_word_embeddings"] = False
        else:
            values["tie_word_embeddings"] = getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings)
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        if values["decoder_start_token_id"] is None:  # T5 starts decoding from the pad token
            values["decoder_start_token_id"] = values["pad_token_id"]
        return cls(**{name: value for name, value in values.items() if value is not None})

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        # transformers reads "gated-gelu" as the tanh approximation, as the original v1.1 checkpoints were trained.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]


def shift_right(labels, decoder_start_token_id: int, pad_token_id: int):
    """labels [B, T] -> decoder_input_ids [B, T]: decoder_start_token_id, then labels[:, :-1]. NumPy in, NumPy out
    (collators); jax in, jax out. -100 (transformers' ignore index) becomes pad_token_id, as transformers does."""
    xp = jnp if isinstance(labels, jax.Array) else np
    shifted = xp.concatenate([xp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return xp.where(shifted == -100, pad_token_id, shifted)


def _bucket_table(num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
    """[max_distance + 1] int32: the bucket of each distance 0..max_distance on one side (longer ones share the last).
    Computed on the host in float32 as mesh-tensorflow/transformers do: XLA's log (even on CPU) can be an ulp off,
    which truncates a value that should be exactly an integer to the bucket below (e.g. distance 80 of 100, causal,
    128 buckets)."""
    if bidirectional:
        num_buckets //= 2
    max_exact = num_buckets // 2
    distance = np.arange(max_distance + 1)
    # max(.., 1) only avoids log(0): the small distances take the exact buckets below.
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int32)
    return np.where(distance < max_exact, distance, np.minimum(large, num_buckets - 1)).astype(np.int32)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128):
    """Int array (key position - query position) -> bucket ids in [0, num_buckets), as transformers'
    `T5Attention._relative_position_bucket`: half the buckets exact distances, half log-spaced up to max_distance.
    Bidirectional (encoder) gives keys after the query the upper half; causal (decoder) maps them to bucket 0."""
    if bidirectional:
        offset = jnp.where(relative_position > 0, num_buckets // 2, 0)
        distance = jnp.abs(relative_position)
    else:
        offset, distance = 0, -jnp.minimum(relative_position, 0)
    table = jnp.asarray(_bucket_table(num_buckets, max_distance, bidirectional))
    return offset + table[jnp.minimum(distance, max_distance)]


class T5Attention(nn.Module):
    """Multi-head attention without bias terms or logit scaling. `kv` projects keys and values (cacheable),
    `__call__` attends to them. The projections are made in setup, for both methods; __call__ is compact because
    `attention` adds its dropout there."""

    config: T5Config
    dtype: Any = jnp.float32

    def setup(self):
        cfg, inner = self.config, self.config.num_heads * self.config.d_kv
        factor = cfg.initializer_factor  # transformers' init; q's std folds in the missing H**-0.5
        self.q = dense(factor * (cfg.d_model * cfg.d_kv) ** -0.5, self.dtype, inner, "q", (EMBED, HEADS),
                       use_bias=False)
        self.k = dense(factor * cfg.d_model**-0.5, self.dtype, inner, "k", (EMBED, HEADS), use_bias=False)
        self.v = dense(factor * cfg.d_model**-0.5, self.dtype, inner, "v", (EMBED, HEADS), use_bias=False)
        self.o = dense(factor * inner**-0.5, self.dtype, cfg.d_model, "o", (HEADS, EMBED), use_bias=False)

    def _split(self, y):
        return y.reshape(*y.shape[:2], self.config.num_heads, self.config.d_kv)

    def kv(self, source):
        """source [B, S, D] -> (keys, values), each [B, S, N, H]."""
        return self._split(self.k(source)), self._split(self.v(source))

    @nn.compact
    def __call__(self, x, k, v, mask, bias, deterministic: bool):
        """x [B, T, D]; k, v [B, S, N, H]; mask bool broadcastable to [B, N, T, S] (True = attend); bias float32
        [1, N, T, S] or None -> [B, T, D]."""
        q = self._split(self.q(x))
        out = attention(q, k, v, mask, bias=bias, scale=1.0, dropout_rate=self.config.dropout_rate,
                        deterministic=deterministic)
        return self.o(out.reshape(*x.shape[:2], -1))


class T5LayerSelfAttention(nn.Module):
    """layer.0: x + dropout(SelfAttention(layer_norm(x))); with a cache, this step's keys/values are written into
    the preallocated buffers at `index` and the queries attend to the buffers."""

    config: T5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, bias, index=None, cache=None):
        """x [B, T, D]; cache None or this layer's {"key", "value"} [B, T_max, N, H] -> (x, updated cache or None)."""
        h = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        attn = T5Attention(self.config, self.dtype, name="SelfAttention")
        k, v = attn.kv(h)
        if cache is not None:
            cache = write_cache(cache, k, v, index)
            k, v = cache["key"], cache["value"]
        h = attn(h, k, v, mask, bias, self.deterministic)
        return x + Dropout(self.config.dropout_rate)(h, deterministic=self.deterministic), cache


class T5LayerCrossAttention(nn.Module):
    """layer.1 of a decoder block: attention to the encoder output, without position bias. With a cache, keys and
    values are projected from the encoder output once (the first call) and read from the cache afterwards."""

    config: T5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, encoder_hidden, encoder_mask, cache=None):
        """x [B, T, D]; encoder_hidden [B, S, D] (may be None when the cache holds keys/values); encoder_mask
        [B, 1, 1, S] -> (x, cache)."""
        h = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        attn = T5Attention(self.config, self.dtype, name="EncDecAttention")
        if cache is not None and "key" in cache:
            k, v = cache["key"], cache["value"]
        else:
            k, v = attn.kv(encoder_hidden)
            if cache is not None:
                cache = {"key": k, "value": v}
        h = attn(h, k, v, encoder_mask, None, self.deterministic)
        return x + Dropout(self.config.dropout_rate)(h, deterministic=self.deterministic), cache


class T5DenseReluDense(nn.Module):
    """wo(dropout(act(wi(x)))), or gated: wo(dropout(act(wi_0(x)) * wi_1(x))). (HF keeps the name for both.)"""

    config: T5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act, std_in = ACT_FNS[cfg.dense_act_fn], cfg.initializer_factor * cfg.d_model**-0.5
        wi = functools.partial(dense, std_in, self.dtype, cfg.d_ff, axes=(EMBED, MLP), use_bias=False)
        if cfg.is_gated_act:
            h = act(wi(name="wi_0")(x)) * wi(name="wi_1")(x)
        else:
            h = act(wi(name="wi")(x))
        h = Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        # transformers keeps `wo` in float32 because v1.1's FFN output overflows float16; bfloat16 has float32's
        # range, so `wo` runs in the computation dtype like the rest.
        return dense(cfg.initializer_factor * cfg.d_ff**-0.5, self.dtype, cfg.d_model, "wo", (MLP, EMBED),
                     use_bias=False)(h)


class T5LayerFF(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        h = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        h = T5DenseReluDense(self.config, self.dtype, self.deterministic, name="DenseReluDense")(h)
        return x + Dropout(self.config.dropout_rate)(h, deterministic=self.deterministic)


class T5BlockLayers(nn.Module):
    """transformers' `block.{i}.layer` list: 0 self-attention, (decoder) 1 cross-attention, last the FFN."""

    config: T5Config
    dtype: Any = jnp.float32
    is_decoder: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, bias, encoder_hidden, encoder_mask, index, cache):
        args = (self.config, self.dtype, self.deterministic)
        x, self_cache = T5LayerSelfAttention(*args, name="0")(x, mask, bias, index,
                                                             None if cache is None else cache["self"])
        if self.is_decoder:
            x, cross_cache = T5LayerCrossAttention(*args, name="1")(x, encoder_hidden, encoder_mask,
                                                                    None if cache is None else cache["cross"])
            if cache is not None:
                cache = {"self": self_cache, "cross": cross_cache}
        return T5LayerFF(*args, name=str(2 if self.is_decoder else 1))(x), cache


class T5Block(nn.Module):
    """One block as nn.scan wants it: (carry, per-layer cache) -> (carry, per-layer cache). `deterministic` is an
    attribute so that scan and remat see only arrays."""

    config: T5Config
    dtype: Any = jnp.float32
    is_decoder: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, bias, encoder_hidden, encoder_mask, index, cache):
        layers = T5BlockLayers(self.config, self.dtype, self.is_decoder, self.deterministic, name="layer")
        return layers(x, mask, bias, encoder_hidden, encoder_mask, index, cache)


class T5Stack(nn.Module):
    """Encoder or decoder: dropout, scanned blocks sharing one relative position bias, final RMS norm, dropout."""

    config: T5Config
    dtype: Any = jnp.float32
    is_decoder: bool = False
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask=None, encoder_hidden=None, encoder_mask=None, cache=None, deterministic=True):
        """x [B, T, D] embedded tokens; mask [B, T] (1 = token, 0 = pad) or None; encoder_hidden [B, S, D] and
        encoder_mask [B, S] (decoder); cache (decoder, see `T5ForConditionalGeneration.init_cache`) or None
        -> (x [B, T, D], updated cache or None)."""
        cfg, length = self.config, x.shape[1]
        if cache is None:
            index, query_pos = None, jnp.arange(length)
            key_pos = query_pos
        else:  # the queries continue at cache["index"]; keys are the whole preallocated buffer
            index = cache["index"]
            query_pos, key_pos = index + jnp.arange(length), jnp.arange(cache["self"]["key"].shape[2])
        self_mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask.astype(bool)[:, None, None, :]
        if self.is_decoder:
            self_mask = self_mask & (key_pos[None, :] <= query_pos[:, None])[None, None]
        buckets = relative_position_bucket(key_pos[None, :] - query_pos[:, None], not self.is_decoder,
                                           cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
        embed = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=jnp.float32,
                         embedding_init=embedding_init(cfg.initializer_factor * cfg.d_model**-0.5, (BUCKETS, HEADS)),
                         name="relative_attention_bias")
        bias = embed(buckets).transpose(2, 0, 1)[None]  # [1, N, T, T or T_max], float32 like the attention logits
        if encoder_mask is not None:
            encoder_mask = encoder_mask.astype(bool)[:, None, None, :]

        blocks = scan_layers(T5Block, cfg.num_decoder_layers if self.is_decoder else cfg.num_layers,
                             self.gradient_checkpointing, in_axes=(nn.broadcast,) * 5 + (0,), keep_only_products=False)
        dropout = Dropout(cfg.dropout_rate, deterministic=deterministic)
        layer_caches = None if cache is None else {k: v for k, v in cache.items() if k != "index"}
        x, layer_caches = blocks(cfg, self.dtype, self.is_decoder, deterministic, name="block")(
            dropout(x), self_mask, bias, encoder_hidden, encoder_mask, index, layer_caches)
        x = dropout(RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x))
        return x, (None if cache is None else {"index": index + length, **layer_caches})


class T5ForConditionalGeneration(nn.Module):
    """T5 / mT5 with the LM head. `encode`, `decode` and `init_cache` (through `apply(..., method=...)`, except
    init_cache which needs no params) let generation run the encoder once and decode with a KV cache."""

    config: T5Config
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return _HF_ARCHITECTURES[self.config.model_type]

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                               embedding_init=embedding_init(cfg.initializer_factor))
        self.encoder = T5Stack(cfg, self.dtype, False, self.gradient_checkpointing)
        self.decoder = T5Stack(cfg, self.dtype, True, self.gradient_checkpointing)
        if not cfg.tie_word_embeddings:  # float32 output, as the tied head below
            self.lm_head = LMHead(cfg.vocab_size, cfg.initializer_factor, name="lm_head")

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
        return self.encoder(self.shared(input_ids), attention_mask, deterministic=deterministic)[0]

    def decode(self, decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask=None, cache=None,
               deterministic: bool = True):
        """decoder_input_ids [B, T]; encoder_hidden [B, S, D]; attention_mask [B, S] of the encoder input
        -> (logits [B, T, V] float32, cache).

        Without a cache: a causal pass over all T tokens (decoder_attention_mask [B, T] masks padded keys).
        With a cache from `init_cache`: the T tokens continue at cache["index"]; the first call projects the
        cross-attention keys/values from encoder_hidden into the cache, later calls may pass encoder_hidden=None.
        """
        if cache is not None and decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask is not supported with a cache (generation pads nothing)")
        x, cache = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden,
                                attention_mask, cache, deterministic)
        if self.config.tie_word_embeddings:
            # v1.0 rescales before the tied head; logits accumulate and stay in float32 for the loss.
            x = x * self.config.d_model**-0.5
            logits = float32_logits("btd,vd->btv", x, self.shared.embedding)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32), cache

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty decoder cache for up to max_length decoder tokens, in models/attention.py's layout: {"index": 0,
        "self": {"key", "value": [L, B, max_length, N, H]}, "cross": {}}; `decode` fills "cross" with keys/values
        [L, B, S, N, H] on its first call."""
        cfg = self.config
        return init_cache(cfg.num_decoder_layers, batch_size, max_length, cfg.num_heads, cfg.d_kv, self.dtype,
                          encoder_decoder=True)


def init_params(module: nn.Module, rng: jax.Array, unbox: bool = True) -> dict:
    """Fresh float32 params (transformers' T5 init). Jitted; under `jax.eval_shape(functools.partial(init_params,
    module), rng)` it allocates nothing. unbox=False keeps flax's LogicallyPartitioned boxes (the logical axis
    names, for parallel.shardings)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.jit(module.init)({"params": rng}, ids, jnp.ones_like(ids), ids)["params"]
    return nn.unbox(params) if unbox else params


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Relative positions set
# no length limit: max_positions is None.
FAMILY = Family(
    model_types=tuple(_HF_ARCHITECTURES), config=T5Config, heads={"Seq2SeqLM": T5ForConditionalGeneration},
    init_params=init_params, max_positions=None, shift_right=shift_right,
    hf=HfRules(
        scanned=("encoder.block", "decoder.block"),
        renamed={f"{stack}.relative_attention_bias": f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
                 for stack in ("encoder", "decoder")},
        # The LM head is tied only in v1.0; a v1.1 template has `lm_head` and hf_io then loads it instead of dropping
        # it.
        tied={"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight",
              "lm_head.weight": "shared.weight"},
        base_prefix={},  # T5Model and T5ForConditionalGeneration share the body's keys
        # Old checkpoints carry a cross-attention position bias that T5 never uses (transformers ignores it too).
        ignored=(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",),
    ),
)

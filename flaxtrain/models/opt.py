"""OPT (transformers' `opt`) causal language models as Flax linen modules.

Learned positions with fairseq's offset: position p reads row p + 2 of `embed_positions`, and without explicit
position_ids a token's position counts the real tokens before it (cumsum of the attention mask - 1, as transformers
does), so left- and right-padded rows compute what they would unpadded. Two layouts: pre-LayerNorm blocks and a final
LayerNorm (opt-125m, opt-1.3b, ...), or post-LayerNorm blocks and no final norm (opt-350m, `do_layer_norm_before`
False). opt-350m also embeds tokens in `word_embed_proj_dim` (512) < hidden_size: `project_in` and `project_out`
map between the two, and the tied LM head works in the smaller width.

Param names copy the PyTorch keys: `model/decoder/layers/self_attn/q_proj/kernel` [L, D, D] is
`model.decoder.layers.{i}.self_attn.q_proj.weight` transposed. The decoder layer here is XGLM's too (models/xglm.py):
its config exposes the fields this layer reads.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D hidden_size, P word_embed_proj_dim,
N heads, H head size, F ffn_dim, V vocab_size, L layers.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from flaxtrain.models.attention import attention, causal_mask, init_cache, next_cache, segment_positions, write_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models import layers
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import CausalLM, init_params
from flaxtrain.models.layers import dense, token_embedding_init
from flaxtrain.models.partitioning import EMBED, HEADS, MLP, POSITIONS, VOCAB, embedding_init, named
from flaxtrain.models.stack import scan_layers

# Offset of OPT's learned positions (fairseq reserved the first two rows): position p reads row p + 2.
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """The fields of a Hugging Face OPT `config.json` that the model uses (defaults: opt-125m).
    word_embed_proj_dim None: hidden_size. remove_final_layer_norm is config.json's `_remove_final_layer_norm`."""

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_function: str = "relu"
    init_std: float = 0.02
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = "opt"

    # Read by OPTDecoderLayer, which XGLM shares: OPT has no dropout after the activation, and LayerNorm's eps.
    activation_dropout = 0.0
    layer_norm_eps = 1e-5

    def __post_init__(self):
        if self.model_type != "opt":
            raise ValueError(f"model_type {self.model_type!r} is not OPT")
        if self.word_embed_proj_dim is None:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "OPTConfig":
        """From a transformers `OPTConfig`; raises ValueError on settings this model lacks."""
        layerdrop = getattr(hf_config, "layerdrop", 0.0) or 0.0
        if layerdrop:
            raise ValueError(f"opt config has unsupported settings: layerdrop={layerdrop} (only 0 is supported)")
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        values["remove_final_layer_norm"] = bool(getattr(hf_config, "_remove_final_layer_norm", False))
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def initializer_range(self) -> float:  # the name gpt2.lm_logits reads for an untied head's init
        return self.init_std

    @property
    def final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


def max_positions(config: OPTConfig) -> int:
    """The longest sequence the learned positions cover; the table has 2 more rows (the offset)."""
    return config.max_position_embeddings


def layer_norm(config, dtype, name: str | None) -> nn.LayerNorm:
    """torch.nn.LayerNorm over D, without params when `layer_norm_elementwise_affine` is False."""
    affine = config.layer_norm_elementwise_affine
    return layers.layer_norm(config.layer_norm_eps, dtype, name, use_bias=affine, use_scale=affine)


def token_embedding(config, dtype, features: int, name: str | None = None) -> nn.Embed:
    """`embed_tokens` [V, features], its pad row zero at init as transformers' nn.Embedding(padding_idx)."""
    init = (nn.initializers.normal(config.init_std) if config.pad_token_id is None
            else token_embedding_init(config.init_std, config.pad_token_id))
    return nn.Embed(config.vocab_size, features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    embedding_init=named(init, VOCAB, EMBED))


class OPTAttention(nn.Module):
    config: Any  # OPTConfig, or XGLMConfig (which has the same fields)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S], layer_cache None or {"key", "value"} [B, S, N, H] -> ([B, T, D], this
        layer's updated cache or None)."""
        cfg = self.config
        n, h = cfg.num_attention_heads, cfg.head_dim

        def project(name):  # -> [B, T, N, H]
            return dense(cfg.init_std, self.dtype, n * h, name, (EMBED, HEADS), use_bias=cfg.enable_bias)(x).reshape(
                *x.shape[:2], n, h)

        # fairseq's order: the query scaled by H**-0.5 after its projection (bias included), the logits unscaled.
        q = project("q_proj") * jnp.asarray(h**-0.5, self.dtype)
        k, v = project("k_proj"), project("v_proj")
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, k, v, index)
            k, v = layer_cache["key"], layer_cache["value"]
        out = attention(q, k, v, mask, scale=1.0, dropout_rate=cfg.attention_dropout, deterministic=deterministic)
        out = dense(cfg.init_std, self.dtype, cfg.hidden_size, "out_proj", (HEADS, EMBED), use_bias=cfg.enable_bias)(
            out.reshape(*x.shape[:2], n * h))
        return out, layer_cache


class OPTDecoderLayer(nn.Module):
    """One block: attention and MLP, each x + dropout(f(norm(x))) (pre-norm) or norm(x + dropout(f(x))) (post-norm,
    opt-350m). `deterministic` is an attribute so that nn.scan and nn.remat see only arrays; the layer's cache slice
    comes in as the scanned input and goes out as the scanned output."""

    config: Any  # OPTConfig, or XGLMConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    def _residual(self, x, name, fn):
        cfg = self.config
        norm = layer_norm(cfg, self.dtype, name)
        h, cache = fn(norm(x) if cfg.do_layer_norm_before else x)
        x = x + Dropout(cfg.dropout)(h, deterministic=self.deterministic)
        return (x if cfg.do_layer_norm_before else norm(x)), cache

    @nn.compact
    def __call__(self, x, mask, index, layer_cache):
        cfg, deterministic = self.config, self.deterministic

        def self_attention(h):
            return OPTAttention(cfg, self.dtype, name="self_attn")(h, mask, index, layer_cache, deterministic)

        def feed_forward(h):
            h = ACT_FNS[cfg.activation_function](
                dense(cfg.init_std, self.dtype, cfg.ffn_dim, "fc1", (EMBED, MLP), use_bias=cfg.enable_bias)(h))
            h = Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
            h = dense(cfg.init_std, self.dtype, cfg.hidden_size, "fc2", (MLP, EMBED), use_bias=cfg.enable_bias)(h)
            return h, None

        x, layer_cache = self._residual(x, "self_attn_layer_norm", self_attention)
        x, _ = self._residual(x, "final_layer_norm", feed_forward)
        return x, layer_cache


def positions_from_mask(valid, start, length: int):
    """valid [B, S] (the keys' mask: the new tokens' own, or the cache's with theirs written at `start`) -> [B, T]
    positions of the T new tokens: the real tokens before each (cumsum - 1, as transformers' OPT), -1 at pads."""
    valid = valid.astype(jnp.int32)
    positions = jnp.cumsum(valid, axis=1) * valid - 1
    return lax.dynamic_slice_in_dim(positions, start, length, axis=1)


class OPTDecoder(nn.Module):
    """The body under `model.decoder`: token and position embeddings (with project_in), the scanned `layers`, the
    final LayerNorm (pre-norm models) and project_out. `deterministic` is an attribute so that setup can build the
    scanned layers."""

    config: OPTConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.embed_tokens = token_embedding(cfg, self.dtype, cfg.word_embed_proj_dim)
        self.embed_positions = nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                        dtype=self.dtype, param_dtype=jnp.float32,
                                        embedding_init=embedding_init(cfg.init_std, (POSITIONS, EMBED)))
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            project = functools.partial(dense, cfg.init_std, self.dtype, axes=(EMBED, EMBED), use_bias=False)
            self.project_in = project(cfg.hidden_size, "project_in")
            self.project_out = project(cfg.word_embed_proj_dim, "project_out")
        self.layers = scan_layers(OPTDecoderLayer, cfg.num_hidden_layers, self.gradient_checkpointing,
                                  in_axes=(nn.broadcast, nn.broadcast, 0))(cfg, self.dtype, self.deterministic)
        if cfg.final_layer_norm:
            self.final_layer_norm = layer_norm(cfg, self.dtype, None)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, P], updated cache or None). See OPTForCausalLM."""
        cfg = self.config
        length = input_ids.shape[1]
        start = 0 if cache is None else cache["index"]
        mask, valid = causal_mask(attention_mask, cache, segment_ids=segment_ids)
        if position_ids is None:  # a packed row's examples each count from 0
            position_ids = (positions_from_mask(valid, start, length) if segment_ids is None
                            else segment_positions(segment_ids))
        x = self.embed_tokens(input_ids)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(position_ids + POSITION_OFFSET)
        x, self_cache = self.layers(x, mask, start, None if cache is None else cache["self"])
        if cfg.final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_out(x)
        return x, next_cache(cache, self_cache, valid, length)

    def word_embedding_matrix(self):
        """[V, P] float32: the LM head's weights when tied to the input embeddings."""
        return self.embed_tokens.embedding


class OPTModel(nn.Module):
    """`model.`: a wrapper around the decoder, as transformers nests it."""

    config: OPTConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        self.decoder = OPTDecoder(self.config, self.dtype, self.gradient_checkpointing, self.deterministic)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        return self.decoder(input_ids, attention_mask, position_ids, cache, segment_ids)

    def word_embedding_matrix(self):
        return self.decoder.word_embedding_matrix()


class OPTForCausalLM(CausalLM):
    """OPT with its LM head (tied to `model.decoder.embed_tokens` unless tie_word_embeddings is False). position_ids
    None: counted from the attention mask, continuing from the cache (with segment_ids: from 0 in each example)."""

    config: OPTConfig
    body, body_name = OPTModel, "model"
    hf_architecture = "OPTForCausalLM"

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        cfg = self.config
        if max_length > max_positions(cfg):
            raise ValueError(f"{max_length} tokens are more than OPT's {max_positions(cfg)} positions")
        return init_cache(cfg.num_hidden_layers, batch_size, max_length, cfg.num_attention_heads, cfg.head_dim,
                          self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is GPT-2's (the
# modules' own initializers: normal(init_std) weights, zero biases, the pad embedding row zero, as transformers).
FAMILY = Family(
    model_types=("opt",), config=OPTConfig, heads={"CausalLM": OPTForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("model.decoder.layers",),
        tied={"lm_head.weight": "model.decoder.embed_tokens.weight"},  # applies only when the config ties them
        base_prefix={"opt": "model"},  # an OPTModel checkpoint (AutoModel) starts at `decoder.`
    ),
)

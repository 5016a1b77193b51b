"""GPT-2 causal language model as Flax linen modules: learned positions, pre-LayerNorm blocks, tied LM head.

Param names copy the transformers PyTorch keys: `transformer/h/attn/c_attn/kernel` [L, D, 3D] is
`transformer.h.{i}.attn.c_attn.weight`, the layers being stacked on a leading axis by `nn.scan`. GPT-2's projections
are transformers' `Conv1D`, whose weight is already stored [in, out] as a flax kernel: the `untransposed` rule of
FAMILY.hf tells `flaxtrain.hf_io` not to transpose them (the untied `lm_head`, an ordinary Linear, is transposed as
usual).

Attention and the key/value cache for generation are models/attention.py's, which every family shares;
`lm_logits` below is the decoders' shared top and `init_params` their shared init (every decoder family uses
them); `CausalLM` is the ...ForCausalLM module of GPT-2, GPT-Neo, OPT, BLOOM, XGLM and the Llama-style ones (GPT-J,
Phi-3 and Gemma have their own: a biased head, longrope's recompute, soft-capped logits).

GPT-SW3 (AI Sweden) is GPT-2 under another model_type: transformers maps "gpt-sw3" to GPT2Config and
GPT2LMHeadModel. `AutoConfig.for_model("gpt-sw3")` says model_type "gpt2", but a config.json that says "gpt-sw3"
loads with that model_type, so both are this family.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D n_embd, N heads, K key/value heads,
H head size, V vocab_size, L layers.
"""

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models.attention import (attention, causal_mask, causal_structure, default_positions, init_cache,
                                        kernel_segments, next_cache, write_cache)
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import LMHead, dense, layer_norm, tied_logits
from flaxtrain.models.partitioning import EMBED, HEADS, MLP, POSITIONS, embedding_init
from flaxtrain.models.stack import scan_layers

_MODEL_TYPES = ("gpt2", "gpt-sw3")  # GPT-SW3's configs are GPT2Configs (see above)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of a Hugging Face GPT-2 `config.json` that the model uses (defaults: gpt2, 124M)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt2"

    def __post_init__(self):
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not GPT-2; expected one of {list(_MODEL_TYPES)}")
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of {self.n_head} heads")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GPT2Config":
        """From a transformers `GPT2Config`; raises ValueError on features this model lacks."""
        unsupported = [name for name, bad in [
            ("add_cross_attention=True", getattr(hf_config, "add_cross_attention", False)),
            ("scale_attn_by_inverse_layer_idx=True", getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)),
        ] if bad]
        if unsupported:
            raise ValueError(f"gpt2 config has unsupported settings: {', '.join(unsupported)}")
        # reorder_and_upcast_attn needs nothing: attention scores are always computed in float32 here.
        return cls(**{f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def max_positions(config: GPT2Config) -> int:
    """The longest sequence (prompt + generated tokens) the model has positions for."""
    return config.n_positions


def _residual_std(config: GPT2Config) -> float:
    # GPT-2's init scales the projections into the residual stream by 1/sqrt(2 * layers), as transformers does.
    return config.initializer_range / math.sqrt(2 * config.n_layer)


class GPT2Attention(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, segments, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S], segments [B, T] (attention.kernel_segments, None with a cache),
        layer_cache None or {"key", "value"} [B, S, N, H] -> ([B, T, D], this layer's updated cache or None)."""
        cfg = self.config
        split = lambda y: y.reshape(*y.shape[:2], cfg.n_head, cfg.head_dim)  # noqa: E731
        qkv = dense(cfg.initializer_range, self.dtype, 3 * cfg.n_embd, "c_attn", (EMBED, HEADS))(x)  # [B, T, 3D]
        q, k, v = map(split, jnp.split(qkv, 3, axis=-1))
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, k, v, index)
            k, v = layer_cache["key"], layer_cache["value"]
        out = attention(q, k, v, mask, scale=None if cfg.scale_attn_weights else 1.0, dropout_rate=cfg.attn_pdrop,
                        deterministic=deterministic, structure=causal_structure(segments))
        out = dense(_residual_std(cfg), self.dtype, cfg.n_embd, "c_proj", (HEADS, EMBED))(
            out.reshape(x.shape))
        return Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), layer_cache


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = dense(cfg.initializer_range, self.dtype, cfg.n_inner or 4 * cfg.n_embd, "c_fc", (EMBED, MLP))(x)
        h = dense(_residual_std(cfg), self.dtype, cfg.n_embd, "c_proj", (MLP, EMBED))(
            ACT_FNS[cfg.activation_function](h))
        return Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    """One pre-LayerNorm block. `deterministic` is an attribute so that nn.scan and nn.remat see only arrays;
    the layer's cache slice comes in as the scanned input and goes out as the scanned output."""

    config: GPT2Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, segments, index, layer_cache):
        cfg = self.config
        h, layer_cache = GPT2Attention(cfg, self.dtype, name="attn")(
            layer_norm(cfg.layer_norm_epsilon, self.dtype, "ln_1")(x), mask, segments, index, layer_cache,
            self.deterministic)
        x = x + h
        x = x + GPT2MLP(cfg, self.dtype, name="mlp")(layer_norm(cfg.layer_norm_epsilon, self.dtype, "ln_2")(x),
                                                     self.deterministic)
        return x, layer_cache


class GPT2Model(nn.Module):
    """The body: token and position embeddings, the scanned blocks `h`, the final LayerNorm `ln_f`.
    `deterministic` is an attribute so that setup can build the scanned blocks."""

    config: GPT2Config
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        embed = functools.partial(nn.Embed, features=cfg.n_embd, dtype=self.dtype, param_dtype=jnp.float32)
        self.wte = embed(cfg.vocab_size, embedding_init=embedding_init(cfg.initializer_range))
        self.wpe = embed(cfg.n_positions, embedding_init=embedding_init(cfg.initializer_range, (POSITIONS, EMBED)))
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = scan_layers(GPT2Block, cfg.n_layer, self.gradient_checkpointing,
                             in_axes=(nn.broadcast,) * 3 + (0,))(cfg, self.dtype, self.deterministic)
        self.ln_f = layer_norm(cfg.layer_norm_epsilon, self.dtype, None)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See GPT2ForCausalLM."""
        start = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache, segment_ids)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids), deterministic=self.deterministic)
        mask, valid = causal_mask(attention_mask, cache, segment_ids=segment_ids)
        if cache is not None and isinstance(cache["self"], tuple):  # generation's per-layer layout
            x, self_cache = self._unrolled(x, mask, start, cache["self"])
        else:
            segments = kernel_segments(attention_mask, cache, segment_ids)
            x, self_cache = self.h(x, mask, segments, start, None if cache is None else cache["self"])
        return self.ln_f(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def _unrolled(self, x, mask, index, caches: tuple):
        """The blocks one after another, as flaxtrain.generate.unroll_layers splits them for the decoding loop: the
        params of `h` and the cache a tuple of one entry per layer ([B, S, N, H] key/value buffers), so that each
        step reads every layer's own weights and writes its own cache buffer in place, where the scan would copy
        each layer's weight and cache slices out of the stacked buffers on every step."""
        block = GPT2Block(self.config, self.dtype, parent=None)
        new = []
        for params, layer_cache in zip(self.variables["params"]["h"], caches, strict=True):
            x, layer_cache = block.apply({"params": params}, x, mask, None, index, layer_cache)
            new.append(layer_cache)
        return x, tuple(new)

    def word_embedding_matrix(self):
        """[V, D] float32: the LM head's weights when tied to the input embeddings."""
        return self.wte.embedding


def lm_logits(module: nn.Module, body: nn.Module, input_ids, attention_mask, position_ids, cache, segment_ids=None):
    """The decoders' shared top, called inside their compact __call__: the body, then the tied or untied head.
    Returns logits [B, T, V] float32, or (logits, cache) when a cache is given."""
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    x, new_cache = body(input_ids, attention_mask, position_ids, cache, segment_ids)
    if module.config.tie_word_embeddings:
        logits = tied_logits(x, body.word_embedding_matrix())
    else:
        logits = LMHead(module.config.vocab_size, module.config.initializer_range, name="lm_head")(x)
    return logits if cache is None else (logits, new_cache)


class CausalLM(nn.Module):
    """A decoder's body with the LM head on top (`lm_logits`). Each family's ...ForCausalLM subclasses it, naming its
    config class, `body` (its body module class, built as body(config, dtype, gradient_checkpointing, deterministic)),
    `body_name` (the body's prefix in the checkpoint keys) and hf_architecture, and defines init_cache."""

    config: Any
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    body: ClassVar[type[nn.Module]]
    body_name: ClassVar[str]

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True, cache=None,
                 segment_ids=None):
        """input_ids [B, T], attention_mask [B, T] (1 = token, 0 = pad; None = all tokens), position_ids [B, T]
        (None: 0..T-1, or continuing from the cache, unless the class says otherwise) -> logits [B, T, V] float32,
        or (logits, cache) when a cache from `init_cache` is given. Dropout needs the "dropout" rng when not
        deterministic. segment_ids [B, T] (packed rows: 1, 2, ... per example, 0 on padding, which then needs no
        attention_mask; no cache): no token attends across examples, and position_ids None restart at 0 in each
        (models/attention.py)."""
        body = self.body(self.config, self.dtype, self.gradient_checkpointing, deterministic, name=self.body_name)
        return lm_logits(self, body, input_ids, attention_mask, position_ids, cache, segment_ids)


class GPT2ForCausalLM(CausalLM):
    """GPT-2 with its LM head (transformers' GPT2LMHeadModel)."""

    config: GPT2Config
    body, body_name = GPT2Model, "transformer"
    hf_architecture = "GPT2LMHeadModel"
    layer_stack = ("transformer", "h")  # the scanned layers' params, which generation splits per layer

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        if max_length > max_positions(self.config):
            raise ValueError(f"{max_length} tokens are more than GPT-2's {max_positions(self.config)} positions")
        cfg = self.config
        return init_cache(cfg.n_layer, batch_size, max_length, cfg.n_head, cfg.head_dim, self.dtype)


def init_params(module: nn.Module, rng: jax.Array, unbox: bool = True) -> dict:
    """Fresh float32 params of any decoder here, from its modules' own initializers, which follow transformers'
    (normal(initializer_range) weights, zero biases, norms at 1). Jitted; under
    `jax.eval_shape(functools.partial(init_params, module), rng)` it allocates nothing. unbox=False keeps flax's
    LogicallyPartitioned boxes (the logical axis names, for parallel.shardings)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.jit(module.init)({"params": rng}, ids, jnp.ones_like(ids))["params"]
    return nn.unbox(params) if unbox else params


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py).
FAMILY = Family(
    model_types=_MODEL_TYPES, config=GPT2Config, heads={"CausalLM": GPT2ForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("transformer.h",),
        tied={"lm_head.weight": "transformer.wte.weight"},  # applies only when the config ties them (the default)
        base_prefix={model_type: "transformer" for model_type in _MODEL_TYPES},
        untransposed=(r"\.(c_attn|c_proj|c_fc)\.weight$",),  # Conv1D weights are [in, out]
        ignored=(r"\.attn\.(masked_)?bias$",),  # causal-mask buffers that older checkpoints saved
    ),
)

"""XGLM (transformers' `xglm`) causal language models as Flax linen modules.

fairseq's sinusoidal positions, computed rather than stored (checkpoints hold none): position p reads row p + 2 of
the table transformers builds, [sin(r * f_i), cos(r * f_i)] with f_i = 10000^(-i / (D/2 - 1)), whose row
`pad_token_id` is zero. Token embeddings scaled by sqrt(D) (`scale_embedding`), dropout, pre-LayerNorm blocks that are
OPT's (models/opt.py; this config exposes the fields they read), a final `layer_norm`, the LM head tied to the token
embeddings (unscaled). As transformers 5's XGLM, positions default to 0..T-1 from the first new token, padding
ignored; generation passes them counted from the mask.

Param names copy the PyTorch keys: `model/layers/self_attn/q_proj/kernel` [L, D, D] is
`model.layers.{i}.self_attn.q_proj.weight` transposed.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D d_model, N heads, H head size, F ffn_dim,
V vocab_size, L layers.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import opt
from flaxtrain.models.attention import causal_mask, default_positions, init_cache, next_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import CausalLM, init_params
from flaxtrain.models.stack import scan_layers


@dataclasses.dataclass(frozen=True)
class XGLMConfig:
    """The fields of a Hugging Face XGLM `config.json` that the model uses (defaults: xglm-564M)."""

    vocab_size: int = 256008
    max_position_embeddings: int = 2048
    d_model: int = 1024
    ffn_dim: int = 4096
    num_layers: int = 24
    attention_heads: int = 16
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = "xglm"

    # What OPT's decoder layer (shared) reads: XGLM's blocks are its pre-norm kind, with biases and affine norms.
    do_layer_norm_before = True
    enable_bias = True
    layer_norm_elementwise_affine = True
    layer_norm_eps = 1e-5

    def __post_init__(self):
        if self.model_type != "xglm":
            raise ValueError(f"model_type {self.model_type!r} is not XGLM")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        if self.d_model % self.attention_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of {self.attention_heads} heads")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "XGLMConfig":
        """From a transformers `XGLMConfig`; raises ValueError on settings this model lacks."""
        unsupported = [f"{name}={value!r}" for name, value, bad in [
            ("add_cross_attention", getattr(hf_config, "add_cross_attention", False),
             getattr(hf_config, "add_cross_attention", False)),
            ("layerdrop", getattr(hf_config, "layerdrop", 0.0), getattr(hf_config, "layerdrop", 0.0) or 0.0),
        ] if bad]
        if unsupported:
            raise ValueError(f"xglm config has unsupported settings: {', '.join(unsupported)}")
        return cls(**{f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)})

    # OPT's names for the same fields, for the shared layer and gpt2.lm_logits.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.attention_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads

    @property
    def initializer_range(self) -> float:
        return self.init_std


def max_positions(config: XGLMConfig) -> int:
    """The sequence length the model was configured (and trained) for; the sinusoids themselves set no limit."""
    return config.max_position_embeddings


def sinusoidal_positions(position_ids, dim: int, pad_token_id: int | None, dtype):
    """position_ids [B, T] -> [B, T, D] in `dtype`: row position_ids + 2 of transformers' XGLM table (fairseq's
    tensor2tensor-style sinusoids, sines then cosines, a zero column if D is odd, the row `pad_token_id` zero).
    Angles rounded to float32 as transformers computes them. The frequencies' exponents too, but their exp is
    rounded once from float64: torch's float32 exp is off by one ulp for a few of them (which then moves a far
    position's angle by up to ~1e-4), and neither numpy's nor XLA's float32 exp errs where torch's does."""
    half = dim // 2
    exponents = np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1))
    freqs = np.exp(exponents.astype(np.float64)).astype(np.float32)
    rows = position_ids + opt.POSITION_OFFSET
    angles = rows.astype(jnp.float32)[..., None] * jnp.asarray(freqs)  # [B, T, D/2]
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if dim % 2:
        table = jnp.pad(table, ((0, 0), (0, 0), (0, 1)))
    if pad_token_id is not None:
        table = jnp.where((rows == pad_token_id)[..., None], 0.0, table)
    return table.astype(dtype)


class XGLMModel(nn.Module):
    """The body (`model.`): scaled token embeddings plus sinusoidal positions, dropout, the scanned `layers`, the
    final `layer_norm`. `deterministic` is an attribute so that setup can build the scanned layers."""

    config: XGLMConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.embed_tokens = opt.token_embedding(cfg, self.dtype, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.layers = scan_layers(opt.OPTDecoderLayer, cfg.num_layers, self.gradient_checkpointing,
                                  in_axes=(nn.broadcast, nn.broadcast, 0))(cfg, self.dtype, self.deterministic)
        self.layer_norm = opt.layer_norm(cfg, self.dtype, None)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See XGLMForCausalLM."""
        cfg = self.config
        start = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache, segment_ids)
        x = self.embed_tokens(input_ids)
        if cfg.scale_embedding:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        x = x + sinusoidal_positions(position_ids, cfg.d_model, cfg.pad_token_id, x.dtype)
        x = self.drop(x, deterministic=self.deterministic)
        mask, valid = causal_mask(attention_mask, cache, segment_ids=segment_ids)
        x, self_cache = self.layers(x, mask, start, None if cache is None else cache["self"])
        return self.layer_norm(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def word_embedding_matrix(self):
        """[V, D] float32: the LM head's weights when tied (the unscaled embeddings)."""
        return self.embed_tokens.embedding


class XGLMForCausalLM(CausalLM):
    """XGLM with its LM head (tied to `model.embed_tokens` unless tie_word_embeddings is False)."""

    config: XGLMConfig
    body, body_name = XGLMModel, "model"
    hf_architecture = "XGLMForCausalLM"

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        cfg = self.config
        return init_cache(cfg.num_layers, batch_size, max_length, cfg.attention_heads, cfg.head_dim, self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is GPT-2's (the
# pad embedding row zero, as OPT's embed_tokens makes it).
FAMILY = Family(
    model_types=("xglm",), config=XGLMConfig, heads={"CausalLM": XGLMForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("model.layers",),
        tied={"lm_head.weight": "model.embed_tokens.weight"},  # applies only when the config ties them
        base_prefix={"xglm": "model"},
        # The sinusoid table (and fairseq's version buffer) that older checkpoints saved; computed here.
        ignored=(r"\.embed_positions\.(weights|_float_tensor)$",),
    ),
)

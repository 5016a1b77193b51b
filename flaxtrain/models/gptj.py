"""GPT-J (EleutherAI's gpt-j-6b) causal language model as Flax linen modules.

As transformers' `modeling_gptj.py` has it:
- a parallel block: x + attn(ln_1(x)) + mlp(ln_1(x)), one LayerNorm for both (no ln_2);
- rotary positions on the first `rotary_dim` dims of each head only, in GPT-J's interleaved layout: dims (0, 1),
  (2, 3), ... are rotated as pairs (`rotate_every_two`), not the two halves that Llama's `rotate_half` pairs. A
  checkpoint's q/k weights are laid out for it, so the two are not interchangeable;
- q/k/v/out Linears without bias, the MLP `fc_in`/`fc_out` with biases, no learned positions;
- an untied `lm_head` with a bias (tied to `wte` when the config says so, the bias kept).

Param names copy the PyTorch keys: `transformer/h/attn/q_proj/kernel` [L, D, D] is
`transformer.h.{i}.attn.q_proj.weight` transposed; `lm_head/bias` [V] is `lm_head.bias`.

Shapes: B batch, T length (new tokens), S keys (T, or the cache length), D n_embd, N heads, H head size,
R rotary_dim, F n_inner, V vocab_size, L layers.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flaxtrain.models.attention import attention, causal_mask, default_positions, init_cache, next_cache, write_cache
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.gpt2 import init_params, tied_logits
from flaxtrain.models.layers import dense, float32_logits, layer_norm
from flaxtrain.models.partitioning import EMBED, HEADS, MLP, VOCAB, embedding_init, named
from flaxtrain.models.stack import scan_layers


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """The fields of a Hugging Face GPT-J `config.json` that the model uses (defaults: gpt-j-6b)."""

    vocab_size: int = 50400
    n_positions: int = 2048
    n_embd: int = 4096
    n_layer: int = 28
    n_head: int = 16
    rotary_dim: int = 64
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None
    model_type: str = "gptj"

    def __post_init__(self):
        if self.model_type != "gptj":
            raise ValueError(f"model_type {self.model_type!r} is not GPT-J")
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of {self.n_head} heads")
        if self.rotary_dim is None or self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            # (transformers 5's GPTJConfig refuses None too; its modeling code would size the table by n_embd.)
            raise ValueError(f"rotary_dim {self.rotary_dim} is not supported: it must be even, at least 2 and at "
                             f"most the head size {self.head_dim}")

    @classmethod
    def from_hf(cls, hf_config: Any) -> "GPTJConfig":
        """From a transformers `GPTJConfig`; raises ValueError on what this model lacks (rotary_dim None, odd or
        larger than the head)."""
        values = {f.name: getattr(hf_config, f.name, f.default) for f in dataclasses.fields(cls)}
        if isinstance(values["eos_token_id"], list):
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def max_positions(config: GPTJConfig) -> int:
    """The longest sequence transformers' sin/cos table covers (positions beyond it fail there)."""
    return config.n_positions


def rotary_tables(position_ids, rotary_dim: int, dtype):
    """position_ids [B, T] -> (sin, cos) [B, T, R] in `dtype`, computed in float32: angle p / 10000^(2i/R) for
    i < R/2, each repeated twice in a row for the pair (2i, 2i + 1) it rotates (GPT-J's interleaved layout)."""
    inv_freq = 1.0 / (10000 ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = jnp.repeat(position_ids.astype(jnp.float32)[..., None] * inv_freq, 2, axis=-1)
    return jnp.sin(angles).astype(dtype), jnp.cos(angles).astype(dtype)


def apply_rotary_every_two(x, sin, cos):
    """x [B, T, N, H], sin/cos [B, T, R] -> x with its first R dims rotated in pairs (2i, 2i + 1):
    x * cos + rotate_every_two(x) * sin, where rotate_every_two(x)[2i, 2i + 1] = (-x[2i + 1], x[2i])."""
    rotary_dim = sin.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = jnp.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    rot = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return jnp.concatenate([rot, rest], axis=-1)


class GPTJAttention(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, sin, cos, index, layer_cache, deterministic: bool):
        """x [B, T, D], mask [B, 1, T, S], sin/cos [B, T, R], layer_cache None or {"key", "value"} [B, S, N, H]
        -> ([B, T, D], this layer's updated cache or None)."""
        cfg = self.config

        def project(name):  # -> [B, T, N, H]
            layer = dense(cfg.initializer_range, self.dtype, cfg.n_embd, name, (EMBED, HEADS), use_bias=False)
            return layer(x).reshape(*x.shape[:2], cfg.n_head, cfg.head_dim)

        q = apply_rotary_every_two(project("q_proj"), sin, cos)
        k = apply_rotary_every_two(project("k_proj"), sin, cos)
        v = project("v_proj")
        if layer_cache is not None:
            layer_cache = write_cache(layer_cache, k, v, index)
            k, v = layer_cache["key"], layer_cache["value"]
        out = attention(q, k, v, mask, dropout_rate=cfg.attn_pdrop, deterministic=deterministic)
        out = dense(cfg.initializer_range, self.dtype, cfg.n_embd, "out_proj", (HEADS, EMBED),
                    use_bias=False)(out.reshape(x.shape))
        return Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), layer_cache


class GPTJMLP(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = dense(cfg.initializer_range, self.dtype, cfg.n_inner or 4 * cfg.n_embd, "fc_in", (EMBED, MLP),
                  use_bias=True)(x)
        h = dense(cfg.initializer_range, self.dtype, cfg.n_embd, "fc_out", (MLP, EMBED),
                  use_bias=True)(ACT_FNS[cfg.activation_function](h))
        return Dropout(cfg.resid_pdrop)(h, deterministic=deterministic)


class GPTJBlock(nn.Module):
    """One parallel block: attention and MLP both read ln_1(x) and add to x. `deterministic` is an attribute so
    that nn.scan and nn.remat see only arrays; the layer's cache slice comes in and goes out as the scanned
    input/output."""

    config: GPTJConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, sin, cos, index, layer_cache):
        cfg = self.config
        h = layer_norm(cfg.layer_norm_epsilon, self.dtype, "ln_1")(x)
        attn, layer_cache = GPTJAttention(cfg, self.dtype, name="attn")(h, mask, sin, cos, index, layer_cache,
                                                                        self.deterministic)
        return x + attn + GPTJMLP(cfg, self.dtype, name="mlp")(h, self.deterministic), layer_cache


class GPTJModel(nn.Module):
    """The body: `wte`, the scanned blocks `h`, the final LayerNorm `ln_f`. `deterministic` is an attribute so that
    setup can build the scanned blocks."""

    config: GPTJConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False
    deterministic: bool = True

    def setup(self):
        cfg = self.config
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=self.dtype, param_dtype=jnp.float32,
                            embedding_init=embedding_init(cfg.initializer_range))
        self.drop = Dropout(cfg.embd_pdrop)
        self.h = scan_layers(GPTJBlock, cfg.n_layer, self.gradient_checkpointing,
                             in_axes=(nn.broadcast,) * 4 + (0,))(cfg, self.dtype, self.deterministic)
        self.ln_f = layer_norm(cfg.layer_norm_epsilon, self.dtype, None)

    def __call__(self, input_ids, attention_mask, position_ids, cache, segment_ids=None):
        """[B, T] ints -> (hidden [B, T, D], updated cache or None). See GPTJForCausalLM."""
        cfg = self.config
        start = 0 if cache is None else cache["index"]
        if position_ids is None:
            position_ids = default_positions(input_ids, cache, segment_ids)
        x = self.drop(self.wte(input_ids), deterministic=self.deterministic)
        sin, cos = rotary_tables(position_ids, cfg.rotary_dim, self.dtype)
        mask, valid = causal_mask(attention_mask, cache, segment_ids=segment_ids)
        x, self_cache = self.h(x, mask, sin, cos, start, None if cache is None else cache["self"])
        return self.ln_f(x), next_cache(cache, self_cache, valid, input_ids.shape[1])

    def word_embedding_matrix(self):
        return self.wte.embedding


class GPTJLMHead(nn.Module):
    """`lm_head`: a Linear with bias, or only the bias when the weights are tied to `wte`."""

    vocab_size: int
    initializer_range: float

    @nn.compact
    def __call__(self, x, tied_embedding=None):
        """x [B, T, D], tied_embedding None or [V, D] -> logits [B, T, V] float32."""
        if tied_embedding is not None:
            logits = tied_logits(x, tied_embedding)
        else:
            kernel = self.param("kernel", named(nn.initializers.normal(self.initializer_range), EMBED, VOCAB),
                                (x.shape[-1], self.vocab_size), jnp.float32)
            logits = float32_logits("btd,dv->btv", x, kernel)
        bias = self.param("bias", named(nn.initializers.zeros_init(), VOCAB), (self.vocab_size,), jnp.float32)
        return logits + bias


class GPTJForCausalLM(nn.Module):
    """GPT-J with its LM head (transformers' GPTJForCausalLM)."""

    config: GPTJConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    hf_architecture = "GPTJForCausalLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True, cache=None,
                 segment_ids=None):
        """input_ids [B, T], attention_mask [B, T] (1 = token, 0 = pad; None = all tokens), position_ids [B, T]
        (None: 0..T-1, or continuing from the cache) -> logits [B, T, V] float32, or (logits, cache) when a cache
        from `init_cache` is given. Dropout needs the "dropout" rng when not deterministic. segment_ids [B, T]:
        packed rows, as gpt2.CausalLM."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        body = GPTJModel(cfg, self.dtype, self.gradient_checkpointing, deterministic, name="transformer")
        x, new_cache = body(input_ids, attention_mask, position_ids, cache, segment_ids)
        head = GPTJLMHead(cfg.vocab_size, cfg.initializer_range, name="lm_head")
        logits = head(x, body.word_embedding_matrix() if cfg.tie_word_embeddings else None)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty key/value cache for `max_length` tokens (models/attention.py's layout)."""
        if max_length > max_positions(self.config):
            raise ValueError(f"{max_length} tokens are more than GPT-J's {max_positions(self.config)} positions")
        cfg = self.config
        return init_cache(cfg.n_layer, batch_size, max_length, cfg.n_head, cfg.head_dim, self.dtype)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Init is GPT-2's.
FAMILY = Family(
    model_types=("gptj",), config=GPTJConfig, heads={"CausalLM": GPTJForCausalLM},
    init_params=init_params, max_positions=max_positions,
    hf=HfRules(
        scanned=("transformer.h",),
        tied={"lm_head.weight": "transformer.wte.weight"},  # applies only when the config ties them
        base_prefix={"gptj": "transformer"},
        ignored=(r"\.attn\.(masked_)?bias$",),  # mask buffers that the Hub's checkpoints saved
    ),
)

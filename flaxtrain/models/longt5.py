"""LongT5 (google/long-t5-local-*, google/long-t5-tglobal-*) with the LM head, as Flax linen modules.

LongT5 is T5 v1.1 (the modules of `flaxtrain.models.t5`: its decoder, FFN, norms, cache and generation interface)
with a sparse encoder self-attention, `encoder_attention_type`:
- "local": the input is cut into blocks of local_radius + 1 tokens; each token attends to the keys of its own block and
  the two neighbouring blocks that lie within local_radius of it;
- "transient-global": local attention plus, for each token, the keys of "global tokens": one per global_block_size
  input tokens, the RMS-normed (`global_input_layer_norm`, per layer) sum of that block's hidden states, projected by
  the same k and v. Their position bias (`global_relative_attention_bias`) is by block distance; a trailing partial
  block joins the one before it, pads belong to none.
As transformers, block 0 holds the position bias tables and every block uses them; here they are `encoder/
LocalSelfAttention/...` or `encoder/TransientGlobalSelfAttention/...`, outside the scan, mapped by FAMILY.hf.renamed.
Masked keys get -1e10 added to their logits (transformers' constant).

Shapes: B batch, S encoder length, T decoder length, D d_model, N heads, H d_kv, L layers, W block length
(local_radius + 1), nb = ceil(S / W) blocks, G = S // global_block_size global tokens, K = 3W (+ G) keys per block.
"""

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import t5
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.layers import LMHead, RMSNorm
from flaxtrain.models.partitioning import BUCKETS, HEADS, embedding_init
from flaxtrain.models.stack import scan_layers

ATTENTION_TYPES = {"local": "LocalSelfAttention", "transient-global": "TransientGlobalSelfAttention"}
_MASKED = -1e10  # transformers' additive mask in LongT5's local and global attention


@dataclasses.dataclass(frozen=True)
class LongT5Config(t5.T5Config):
    """T5's fields plus the encoder attention's (defaults: long-t5-local-base's attention on T5's sizes)."""

    local_radius: int = 127
    global_block_size: int = 16
    encoder_attention_type: str = "local"
    model_type: str = "longt5"

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("longt5",)

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_attention_type not in ATTENTION_TYPES:
            raise ValueError(f"encoder_attention_type {self.encoder_attention_type!r} is not supported; supported: "
                             f"{list(ATTENTION_TYPES)}")

    @property
    def block_len(self) -> int:
        return self.local_radius + 1

    @property
    def is_transient_global(self) -> bool:
        return self.encoder_attention_type == "transient-global"


def _blocks(x, block_len: int, axis: int = 1):
    """x [..., S, ...] -> [..., nb, W, ...] along `axis`, zero-padded to a multiple of W."""
    pad = -x.shape[axis] % block_len
    x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    return x.reshape(*x.shape[:axis], x.shape[axis] // block_len, block_len, *x.shape[axis + 1:])


def _three_blocks(x):
    """x [B, nb, W, ...] -> [B, nb, 3W, ...]: each block with its neighbours (zeros beyond the ends)."""
    padded = jnp.pad(x, [(0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2))
    return jnp.concatenate([padded[:, i:i + x.shape[1]] for i in range(3)], axis=2)


def local_mask(mask, block_len: int):
    """mask [B, S] bool -> [B, nb, W, 3W] bool: query and key are tokens, and within local_radius of each other."""
    blocked = _blocks(mask, block_len)
    near = np.abs(np.arange(3 * block_len)[None, :] - np.arange(block_len, 2 * block_len)[:, None]) < block_len
    return blocked[:, :, :, None] & _three_blocks(blocked)[:, :, None, :] & near


def global_block_ids(mask, global_block_size: int):
    """transformers' `_make_global_fixed_block_ids`: mask [B, S] bool -> (block_ids [B, S] int32: the global token
    of each token, -1 for pads and for a sequence without a full block; segment_ids [B, G] int32: 1 where the global
    token exists). The block of each position is computed as transformers does on the CPU (a float32 cumulative sum of
    1/global_block_size accumulated in float64, then floor), so that a size that is not a power of 2 matches too."""
    length = mask.shape[1]
    step = np.float32(1.0) / np.float32(global_block_size)
    fixed = np.cumsum(np.full(length, step, np.float32), dtype=np.float64).astype(np.float32) - step
    ids = np.floor((np.float32(1.0) + fixed) - np.float32(1.0)).astype(np.int32)
    ids = jnp.where(mask, ids, -1)
    # A trailing partial block joins the last full one (an "orphan" in transformers' words).
    ends = (np.arange(length) % global_block_size) == global_block_size - 1
    full = jnp.sum(ends & (ids >= 0), axis=-1, keepdims=True) - 1
    ids = jnp.where(ids < full, ids, full)
    segments = jnp.arange(length // global_block_size)[None, :] <= ids.max(axis=-1, keepdims=True)
    return ids, segments.astype(jnp.int32)


class _BiasTables(nn.Module):
    """The relative position bias tables that transformers keeps in block 0's attention: `relative_attention_bias`
    and, for transient-global, `global_relative_attention_bias`."""

    config: LongT5Config

    @nn.compact
    def __call__(self, buckets, name: str):
        cfg = self.config
        embed = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, param_dtype=jnp.float32, name=name,
                         embedding_init=embedding_init(cfg.initializer_factor * cfg.d_model**-0.5, (BUCKETS, HEADS)))
        return embed(buckets)


class LongT5EncoderAttention(t5.T5Attention):
    """`LocalSelfAttention` or `TransientGlobalSelfAttention`: T5's q, k, v, o (and for transient-global the norm of
    the global tokens) applied block by block."""

    def setup(self):
        super().setup()
        if self.config.is_transient_global:
            self.global_input_layer_norm = RMSNorm(self.config.layer_norm_epsilon, self.dtype, name=None)

    def attend(self, h, bias, block_ids, deterministic: bool):
        """h [B, S, D] (normed); bias [B, nb, N, W, K] float32; block_ids [B, S] (transient-global) -> [B, S, D]."""
        cfg, (b, length, _) = self.config, h.shape
        k, v = (_three_blocks(_blocks(x, cfg.block_len)) for x in self.kv(h))  # [B, nb, 3W, N, H]
        if cfg.is_transient_global:
            groups = length // cfg.global_block_size
            members = jax.nn.one_hot(block_ids, groups, dtype=h.dtype)  # [B, S, G]; -1 (no global token): zeros
            side = self.global_input_layer_norm(jnp.einsum("bsd,bsg->bgd", h, members))
            k, v = (jnp.concatenate([x, jnp.broadcast_to(s[:, None], (*x.shape[:2], *s.shape[1:]))], axis=2)
                    for x, s in zip((k, v), self.kv(side)))
        queries = _blocks(h, cfg.block_len)
        nb = queries.shape[1]
        out = self(queries.reshape(b * nb, cfg.block_len, -1), k.reshape(b * nb, *k.shape[2:]),
                   v.reshape(b * nb, *v.shape[2:]), None, bias.reshape(b * nb, *bias.shape[2:]), deterministic)
        return out.reshape(b, nb * cfg.block_len, -1)[:, :length]


class _SelfAttentionLayer(nn.Module):
    """layer.0: x + dropout(attention(layer_norm(x)))."""

    config: LongT5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, block_ids):
        cfg = self.config
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        attn = LongT5EncoderAttention(cfg, self.dtype, name=ATTENTION_TYPES[cfg.encoder_attention_type])
        h = attn.attend(h, bias, block_ids, self.deterministic)
        return x + Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)


class LongT5EncoderLayers(nn.Module):
    """transformers' `block.{i}.layer` of the encoder: 0 the local or transient-global self-attention, 1 the FFN."""

    config: LongT5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, block_ids):
        args = (self.config, self.dtype, self.deterministic)
        return t5.T5LayerFF(*args, name="1")(_SelfAttentionLayer(*args, name="0")(x, bias, block_ids))


class LongT5EncoderBlock(nn.Module):
    """One encoder block as nn.scan wants it: (carry, shared inputs) -> (carry, None)."""

    config: LongT5Config
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, bias, block_ids):
        return LongT5EncoderLayers(self.config, self.dtype, self.deterministic, name="layer")(x, bias, block_ids), None


class LongT5EncoderStack(nn.Module):
    """The encoder: dropout, scanned blocks sharing one position bias (local, and side for transient-global, with the
    masks folded in as -1e10), final RMS norm, dropout."""

    config: LongT5Config
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        """x [B, S, D] embedded tokens; mask [B, S] (1 = token, 0 = pad) or None -> (x [B, S, D], None), as
        `t5.T5Stack` returns (no cache)."""
        cfg, (b, length) = self.config, x.shape[:2]
        mask = jnp.ones((b, length), bool) if mask is None else mask.astype(bool)
        tables = _BiasTables(cfg, name=ATTENTION_TYPES[cfg.encoder_attention_type])
        bucket = functools.partial(t5.relative_position_bucket, bidirectional=True,
                                   num_buckets=cfg.relative_attention_num_buckets,
                                   max_distance=cfg.relative_attention_max_distance)
        w = cfg.block_len
        relative = np.arange(3 * w)[None, :] - np.arange(w, 2 * w)[:, None]  # [W, 3W]: key - query
        position = tables(bucket(relative), "relative_attention_bias").transpose(2, 0, 1)  # [N, W, 3W]
        bias = position + jnp.where(local_mask(mask, w), 0.0, _MASKED)[:, :, None]  # [B, nb, N, W, 3W]
        block_ids = None
        if cfg.is_transient_global:
            block_ids, segments = global_block_ids(mask, cfg.global_block_size)
            # A token sees the global tokens that exist; a pad those that do not (transformers compares mask values).
            visible = mask.astype(jnp.int32)[:, :, None] == segments[:, None, :]  # [B, S, G]
            distance = jnp.arange(segments.shape[1])[None, None, :] - block_ids[..., None]
            side = jnp.where(visible, 0.0, _MASKED)[..., None] + tables(bucket(distance),
                                                                       "global_relative_attention_bias")
            side = _blocks(side, w).transpose(0, 1, 4, 2, 3)  # [B, S, G, N] -> [B, nb, N, W, G]
            bias = jnp.concatenate([bias, side], axis=-1)

        blocks = scan_layers(LongT5EncoderBlock, cfg.num_layers, self.gradient_checkpointing,
                             in_axes=(nn.broadcast, nn.broadcast))
        dropout = Dropout(cfg.dropout_rate, deterministic=deterministic)
        x, _ = blocks(cfg, self.dtype, deterministic, name="block")(dropout(x), bias, block_ids)
        return dropout(RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)), None


class LongT5ForConditionalGeneration(t5.T5ForConditionalGeneration):
    """LongT5 with the LM head: T5's `__call__`, `encode`, `decode` and `init_cache` (so run_summarization_flax.py,
    run_t5_mlm_flax.py and flaxtrain/generate_seq2seq.py use it as T5) over the LongT5 encoder."""

    config: LongT5Config

    @property
    def hf_architecture(self) -> str:
        return "LongT5ForConditionalGeneration"

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                               embedding_init=embedding_init(cfg.initializer_factor))
        self.encoder = LongT5EncoderStack(cfg, self.dtype, self.gradient_checkpointing)
        self.decoder = t5.T5Stack(cfg, self.dtype, True, self.gradient_checkpointing)
        if not cfg.tie_word_embeddings:  # float32 output, as the tied head
            self.lm_head = LMHead(cfg.vocab_size, cfg.initializer_factor)


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). Relative positions set
# no length limit: max_positions is None.
FAMILY = Family(
    model_types=("longt5",), config=LongT5Config, heads={"Seq2SeqLM": LongT5ForConditionalGeneration},
    init_params=t5.init_params, max_positions=None, shift_right=t5.shift_right,
    hf=HfRules(
        scanned=("encoder.block", "decoder.block"),
        renamed={**{f"encoder.{name}": f"encoder.block.0.layer.0.{name}" for name in ATTENTION_TYPES.values()},
                 "decoder.relative_attention_bias": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"},
        tied=t5.FAMILY.hf.tied, base_prefix={},
        ignored=t5.FAMILY.hf.ignored,
    ),
)

"""BART and mBART encoder-decoders (the LM head, a sequence classifier, and the LM head as a masked LM), as Flax
linen modules; the layers of every BART-like family (flaxtrain/models/pegasus.py, marian.py, blenderbot.py).

Param names copy the transformers PyTorch keys: `model/encoder/layers/self_attn/q_proj/kernel` [L, D, D] is
`model.encoder.layers.{i}.self_attn.q_proj.weight` transposed, the layers being stacked by `nn.scan`. The token
embedding is `model/shared` (the encoder's and decoder's `embed_tokens` and the `lm_head` are copies of it in
PyTorch: the `tied` rule of FAMILY.hf); `final_logits_bias` [1, V] is a buffer in PyTorch, saved with the checkpoint
and never trained. Here it is a param that the forward pass reads through stop_gradient (and training.decay_mask
skips it), so training leaves it as loaded.

The BART-like model types differ in the layout fields of their configs (BartConfig's last fields): pre-layer-norm
blocks (`normalize_before`), a final `layer_norm` after each stack's last layer (`add_final_layer_norm`), a
`layernorm_embedding` after the embeddings, and the positions: learned (BART's table has 2 extra leading rows,
`position_offset`) or another module (Pegasus's and Marian's sinusoidal ones). mBART is BART with pre-norm and
final norms, which `model_type` sets. `scale_embedding` (config.json) multiplies the token embeddings by sqrt(D).

Shapes: B batch, S encoder length, T decoder length, D d_model, N heads, H head size, F ffn dim, V vocab_size,
L layers, P max_position_embeddings, K masked positions.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxtrain.models import t5
from flaxtrain.models.attention import attention, init_cache, write_cache
from flaxtrain.models.bart_config import (HF_ARCHITECTURES, BartConfig, hf_rules,  # noqa: F401 (bart's names)
                                           max_positions, shift_input_ids, shift_tokens_right)
from flaxtrain.models.bert import ACT_FNS, at_positions
from flaxtrain.models.dropout import Dropout
from flaxtrain.models.family import Family
from flaxtrain.models.layers import dense, float32_logits, layer_norm, token_embedding_init
from flaxtrain.models.partitioning import CLASSES, EMBED, HEADS, MLP, POSITIONS, VOCAB, embedding_init, named
from flaxtrain.models.stack import scan_layers


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
            dense(cfg.init_std, self.dtype, cfg.d_model, name, (EMBED, HEADS))
            for name in ("q_proj", "k_proj", "v_proj"))
        self.out_proj = dense(cfg.init_std, self.dtype, cfg.d_model, "out_proj", (HEADS, EMBED))

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

    def attend_keys_last(self, x, k, v, mask):
        """__call__ without dropout for keys and values stored keys last, [B, N, H, S] (the decoding loop's
        cross-attention cache, flaxtrain.generate.unroll_layers): both products then read them as they lie, where
        [B, S, N, H] costs a transpose of each on every step (a third of bart-small's decoding op time on a CPU)."""
        q = self._split(self.q_proj(x))  # [B, T, N, H]
        logits = jnp.einsum("btnh,bnhs->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1]**-0.5
        probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
        out = jnp.einsum("bnts,bnhs->btnh", probs.astype(v.dtype), v)
        return self.out_proj(out.reshape(*x.shape[:2], -1))


class BartLayer(nn.Module):
    """One encoder or decoder layer, as nn.scan wants it: (x, broadcast inputs, per-layer cache) -> (x, cache).
    Each sublayer is x + dropout(f(x)) followed by its layer norm (BART), or preceded by it (mBART)."""

    config: BartConfig
    dtype: Any = jnp.float32
    is_decoder: bool = False
    deterministic: bool = True
    cross_keys_last: bool = False  # a filled cross-attention cache is keys last (BartAttention.attend_keys_last)

    def _residual(self, x, name, fn):
        """Post-norm norm(x + dropout(fn(x))) or pre-norm x + dropout(fn(norm(x))); fn may also return a cache."""
        norm = layer_norm(self.config.layer_norm_eps, self.dtype, name)
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
            if cache is not None and "key" in cache["cross"] and self.cross_keys_last:
                return attn.attend_keys_last(h, cache["cross"]["key"], cache["cross"]["value"], encoder_mask), \
                    cache["cross"]
            if cache is not None and "key" in cache["cross"]:
                k, v = cache["cross"]["key"], cache["cross"]["value"]
            else:
                k, v = attn.kv(encoder_hidden)
            return attn(h, k, v, encoder_mask, deterministic), {"key": k, "value": v}

        def feed_forward(h):
            ffn_dim = cfg.decoder_ffn_dim if self.is_decoder else cfg.encoder_ffn_dim
            h = ACT_FNS[cfg.activation_function](dense(cfg.init_std, self.dtype, ffn_dim, "fc1", (EMBED, MLP))(h))
            h = Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
            return dense(cfg.init_std, self.dtype, cfg.d_model, "fc2", (MLP, EMBED))(h), None

        x, self_cache = self._residual(x, "self_attn_layer_norm", self_attention)
        if self.is_decoder:
            x, cross_cache = self._residual(x, "encoder_attn_layer_norm", cross_attention)
        x, _ = self._residual(x, "final_layer_norm", feed_forward)
        return x, (None if cache is None else {"self": self_cache, "cross": cross_cache})


class BartStack(nn.Module):
    """Encoder or decoder: embedded tokens + positions, `layernorm_embedding` (if the layout has it), dropout,
    scanned layers, the final `layer_norm` (if the layout has it)."""

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
            slots = jax.tree.leaves(cache["self"])[0].shape[-3]  # [L, B, S, N, H], or per layer [B, S, N, H]
            query_pos, key_pos = index + jnp.arange(length), jnp.arange(slots)
        if cfg.learned_positions:
            positions = nn.Embed(cfg.max_position_embeddings + cfg.position_offset, cfg.d_model, dtype=self.dtype,
                                 param_dtype=jnp.float32, name="embed_positions",
                                 embedding_init=embedding_init(cfg.init_std, (POSITIONS, EMBED)))
            positions = positions(query_pos + cfg.position_offset)[None]
        else:
            positions = type(cfg).POSITIONS(cfg, self.dtype, name="embed_positions")(query_pos)[None]
        if not cfg.layernorm_embedding:
            x = x + positions
        elif self.is_decoder and cfg.decoder_norms_tokens:
            x = layer_norm(cfg.layer_norm_eps, self.dtype, "layernorm_embedding")(x) + positions
        else:
            x = layer_norm(cfg.layer_norm_eps, self.dtype, "layernorm_embedding")(x + positions)
        x = Dropout(cfg.dropout)(x, deterministic=deterministic)

        self_mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask.astype(bool)[:, None, None, :]
        if self.is_decoder:
            self_mask = self_mask & (key_pos[None, :] <= query_pos[:, None])[None, None]
        if encoder_mask is not None:
            encoder_mask = encoder_mask.astype(bool)[:, None, None, :]

        layer_caches = None if cache is None else {k: v for k, v in cache.items() if k != "index"}
        if cache is not None and isinstance(cache["self"], tuple):  # generation's per-layer layout
            x, layer_caches = self._unrolled(x, self_mask, encoder_hidden, encoder_mask, index, layer_caches)
        else:
            layers = scan_layers(BartLayer, cfg.decoder_layers if self.is_decoder else cfg.encoder_layers,
                                 self.gradient_checkpointing, in_axes=(nn.broadcast,) * 4 + (0,))
            x, layer_caches = layers(cfg, self.dtype, self.is_decoder, deterministic, name="layers")(
                x, self_mask, encoder_hidden, encoder_mask, index, layer_caches)
        if cfg.add_final_layer_norm:
            x = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm")(x)
        return x, (None if cache is None else {"index": index + length, **layer_caches})

    def _unrolled(self, x, mask, encoder_hidden, encoder_mask, index, caches: dict):
        """The decoder's layers one after another, as flaxtrain.generate.unroll_layers splits them for the decoding
        loop: the params of `layers` and caches["self"] a tuple of one entry per layer, caches["cross"] {} or such a
        tuple, so that each step reads every layer's own weights and buffers (a scan would copy each layer's slices
        of the stacked ones on every step). The cross-attention keys/values, once made, are passed on as the same
        arrays: loop invariants, which XLA lays out for the attention's products once, not on every step.
        Generation only: deterministic (no dropout)."""
        layer = BartLayer(self.config, self.dtype, self.is_decoder, cross_keys_last=True, parent=None)
        self_caches, cross_caches = [], []
        for i, params in enumerate(self.variables["params"]["layers"]):
            layer_cache = {"self": caches["self"][i], "cross": caches["cross"][i] if caches["cross"] else {}}
            x, layer_cache = layer.apply({"params": params}, x, mask, encoder_hidden, encoder_mask, index, layer_cache)
            self_caches.append(layer_cache["self"])
            cross_caches.append(layer_cache["cross"])
        return x, {"self": tuple(self_caches), "cross": caches["cross"] or tuple(cross_caches)}


class BartModel(nn.Module):
    """The body (`model.` in the checkpoints): the shared token embedding, the encoder and the decoder."""

    config: BartConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        cfg = self.config
        init = named(token_embedding_init(cfg.init_std, cfg.pad_token_id), VOCAB, EMBED)
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                               embedding_init=init)
        self.encoder = BartStack(cfg, self.dtype, False, self.gradient_checkpointing)
        self.decoder = BartStack(cfg, self.dtype, True, self.gradient_checkpointing)

    def _embed(self, ids):
        """[B, T] -> [B, T, D]; scale_embedding multiplies by sqrt(D)."""
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
        kind = "learned positions" if config.learned_positions else "positions"
        raise ValueError(f"{what} of {length} tokens is longer than the {max_positions(config)} {kind} "
                         "(max_position_embeddings)")


class BartForConditionalGeneration(nn.Module):
    """A BART-like model with the LM head (tied to `model.shared`, plus `final_logits_bias`). `encode`, `decode` and
    `init_cache` (through `apply(..., method=...)`, except init_cache which needs no params) let generation run
    the encoder once and decode with a KV cache, as `flaxtrain.models.t5.T5ForConditionalGeneration`."""

    config: BartConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    layer_stack = ("model", "decoder", "layers")  # the decoder's scanned layers, which generation splits per layer

    @property
    def hf_architecture(self) -> str:
        return HF_ARCHITECTURES[self.config.model_type]

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
        x, cache = self._decoder_hidden(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask,
                                        cache, deterministic)
        return self._logits(x), cache

    def _decoder_hidden(self, decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, cache,
                        deterministic):
        """-> (the decoder's output [B, T, D], cache)."""
        if cache is not None and decoder_attention_mask is not None:
            raise ValueError("decoder_attention_mask is not supported with a cache (generation pads nothing)")
        if cache is None:
            _check_length(self.config, decoder_input_ids.shape[1], "a decoder input")
        return self.model.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask, cache,
                                 deterministic)

    def _logits(self, x):
        """[..., D] -> [..., V] float32. The matmul runs in the computation dtype with float32 accumulation."""
        logits = float32_logits("...d,vd->...v", x, self.model.output_embedding())
        return logits + jax.lax.stop_gradient(self.final_logits_bias)[0]  # a buffer: never trained

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """An empty decoder cache for up to max_length decoder tokens, in models/attention.py's layout: {"index": 0,
        "self": {"key", "value": [L, B, max_length, N, H]}, "cross": {}}; `decode` fills "cross" with keys/values
        [L, B, S, N, H] on its first call."""
        cfg = self.config
        _check_length(cfg, max_length, "a decoder cache")
        return init_cache(cfg.decoder_layers, batch_size, max_length, cfg.decoder_attention_heads,
                          cfg.decoder_head_dim, self.dtype, encoder_decoder=True)


class BartForMaskedLM(BartForConditionalGeneration):
    """BART/mBART as the original run_mlm_flax.py trained them (FlaxAutoModelForMaskedLM was the conditional-
    generation model): the masked input_ids go to the encoder, and shifted right (as transformers' models shift
    them when given no decoder input) to the decoder, whose output at t predicts token t. Params and checkpoint are
    BartForConditionalGeneration's."""

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """input_ids, attention_mask [B, T] -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (as
        bert.BertForMaskedLM; token_type_ids are ignored)."""
        encoder_hidden = self.encode(input_ids, attention_mask, deterministic)
        x, _ = self._decoder_hidden(shift_input_ids(self.config, input_ids), encoder_hidden, attention_mask, None,
                                    None, deterministic)
        return self._logits(at_positions(x, positions))


class BartForSequenceClassification(nn.Module):
    """BART/mBART with `classification_head.{dense,out_proj}` (dropout, dense, tanh, dropout, out_proj) on the
    decoder's output at each row's last end-of-sequence token, the decoder reading input_ids shifted right, as
    transformers' (which requires every row to have the same number of eos tokens and takes the last; here each
    row's last eos is taken, and a row without one, e.g. a batch's padding row, takes its last token)."""

    config: BartConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return {"bart": "BartForSequenceClassification", "mbart": "MBartForSequenceClassification"}[
            self.config.model_type]

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask [B, T] (token_type_ids ignored) -> logits [B, num_labels] float32."""
        cfg = self.config
        _check_length(cfg, input_ids.shape[1], "an input")
        body = BartModel(cfg, self.dtype, self.gradient_checkpointing, name="model")
        encoder_hidden = body.encode(input_ids, attention_mask, deterministic)
        hidden, _ = body.decode(shift_input_ids(cfg, input_ids), encoder_hidden, attention_mask, None, None,
                                deterministic)
        length = input_ids.shape[1]
        is_eos = jnp.isin(input_ids, jnp.asarray(cfg.eos_token_id))
        last_eos = length - 1 - jnp.argmax(is_eos[:, ::-1], axis=1)
        last_token = jnp.maximum(jnp.sum(attention_mask, axis=1) - 1, 0)
        row = jnp.where(is_eos.any(axis=1), last_eos, last_token)
        x = jnp.take_along_axis(hidden, row[:, None, None], axis=1)[:, 0]  # [B, D]
        return BartClassificationHead(cfg, self.dtype, name="classification_head")(x, deterministic)


class BartClassificationHead(nn.Module):
    """dropout, dense, tanh, dropout, out_proj: [B, D] -> [B, num_labels] float32."""

    config: BartConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        dropout = Dropout(cfg.classifier_dropout, deterministic=deterministic)
        x = jnp.tanh(dense(cfg.init_std, self.dtype, cfg.d_model, "dense", (EMBED, EMBED))(dropout(x)))
        logits = dense(cfg.init_std, self.dtype, cfg.num_labels, "out_proj", (EMBED, CLASSES))(dropout(x))
        return logits.astype(jnp.float32)


def init_params(module: nn.Module, rng: jax.Array, unbox: bool = True) -> dict:
    """Fresh float32 params (transformers' BART init: normal(init_std), zero biases, pad embedding row zero,
    sinusoidal tables as transformers makes them). Jitted; under `jax.eval_shape(functools.partial(init_params,
    module), rng)` it allocates nothing. unbox=False keeps flax's LogicallyPartitioned boxes (the logical axis names,
    for parallel.shardings)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    # The third argument is the decoder input (Seq2SeqLM), or token types (ignored): zeros either way.
    params = jax.jit(module.init)({"params": rng}, ids, jnp.ones_like(ids), ids)["params"]
    return nn.unbox(params) if unbox else params


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py). BART's shift is T5's
# (bart_config.shift_tokens_right is the same with transformers' argument order).
FAMILY = Family(
    model_types=BartConfig.MODEL_TYPES, config=BartConfig,
    heads={"Seq2SeqLM": BartForConditionalGeneration, "SequenceClassification": BartForSequenceClassification,
           "MaskedLM": BartForMaskedLM},
    init_params=init_params, max_positions=max_positions, shift_right=t5.FAMILY.shift_right,
    hf=hf_rules(BartConfig.MODEL_TYPES),
)

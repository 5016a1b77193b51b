"""BigBird (google/bigbird-roberta-*) with masked-LM and sequence-classification heads, as Flax linen modules.

The body is BERT's (the modules of `flaxtrain.models.bert`, under `bert` as transformers names it) with four
differences: the embeddings may be rescaled by D**0.5 and drop out before their LayerNorm, not after; q/k/v may have
no bias (use_bias); the pooler is a bare `bert.pooler` Dense, present in every head's checkpoint though only
BigBirdForPreTraining uses it; and the self-attention may be block sparse (attention_type "block_sparse").

Block-sparse attention (Zaheer et al. 2020, ITC form), over blocks of block_size tokens, nb = T / block_size of them:
query blocks 0 and nb-1 attend to every key; every other query block i to key blocks 0 and nb-1 (global), i-1, i, i+1
(sliding; for i = 1 and nb-2 the window is cut at the ends) and num_random_blocks random blocks. As transformers 5
does it: in training the random blocks are drawn with NumPy seeded by the layer index (so the same blocks every step),
in evaluation there is no randomness and every random block is block 0 (which queries then count 1 + r times in
their softmax); masked keys get -10000 added to their logits; no attention dropout. An input too short for the
pattern (T <= (5 + 2r) block_size) runs full attention instead, with transformers' warning; a longer one is padded to
a multiple of block_size inside the model and cut back after the encoder.

Shapes: B batch, T length, D hidden_size, N heads, H head size, V vocab_size, L layers, nb blocks, r random blocks,
K = 5 + r key blocks of a middle query block.
"""

import contextlib
import dataclasses
import logging
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import bert
from flaxtrain.models.attention import attention
from flaxtrain.models.family import Family, HfRules
from flaxtrain.models.partitioning import EMBED, HEADS, dense_inits
from flaxtrain.models.stack import scan_layers

logger = logging.getLogger(__name__)

ATTENTION_TYPES = ("block_sparse", "original_full")
_PENALTY = -10000.0  # transformers' (and the original's) additive mask in block-sparse attention


@dataclasses.dataclass(frozen=True)
class BigBirdConfig(bert.BertConfig):
    """A Hugging Face BigBird `config.json`'s fields: BERT's plus the attention's (defaults: bigbird-roberta-base)."""

    vocab_size: int = 50358
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 4096
    model_type: str = "big_bird"
    attention_type: str = "block_sparse"
    use_bias: bool = True
    rescale_embeddings: bool = False
    block_size: int = 64
    num_random_blocks: int = 3

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("big_bird",)

    def __post_init__(self):
        super().__post_init__()
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type {self.attention_type!r} is not supported; supported: {ATTENTION_TYPES}")

    def uses_block_sparse(self, length: int) -> bool:
        """Whether an input of `length` tokens runs block-sparse attention (else full attention, as transformers)."""
        return self.attention_type == "block_sparse" and length > (5 + 2 * self.num_random_blocks) * self.block_size


# ---------------------------------------------------------------------------------------------------------------------
# Random blocks: transformers' NumPy code (BigBirdBlockSparseAttention), run on the host at trace time.


def _rand_attn_plan(length: int, block_size: int, r: int) -> tuple[list[int], list[int]]:
    """transformers' `_get_rand_attn_plan`: (plan_from_length, plan_num_rand_blocks)."""
    blocks = length // block_size
    if 2 * r + 5 < blocks:
        return [(2 * r + 5) * block_size, length], [r, 0]
    if r + 5 < blocks:
        return [(r + 5) * block_size, length], [r // 2, r - r // 2]
    return [length], [r]


def _row_blocks(rs, block_id: int, start: int, end: int, r: int) -> np.ndarray:
    """transformers' `_get_single_block_row_attention` (window and globals of one block each side)."""
    permuted = rs.permutation(np.arange(start, end, dtype=np.int32))
    illegal = {block_id - 1, block_id, block_id + 1, 0, end - 1}
    if block_id == 1:
        illegal.add(end - 2)
    if block_id == end - 2:
        illegal.add(1)
    return np.array([b for b in permuted if b not in illegal][:r], dtype=np.int32)


def _rand_with_head(rs, length: int, block_size: int, heads: int, r: int) -> np.ndarray:
    """transformers' `_bigbird_block_rand_mask_with_head` on its own plan -> [N, nb - 2, r]."""
    plan_length, plan_r = _rand_attn_plan(length, block_size, r)
    blocks = length // block_size
    plan_blocks = [p // block_size for p in plan_length]
    last_plan = plan_length.index(length)
    rand = np.zeros((heads, blocks, sum(plan_r[:last_plan + 1])), np.int32)

    def fill(row, lo, hi, start, end, count):
        for h in range(heads):
            rand[h, row, lo:hi] = _row_blocks(rs, row, start, end, count)

    for p in range(last_plan + 1):
        if p > 0:
            if plan_r[p] > 0:
                for row in range(1, plan_blocks[p - 1]):
                    fill(row, sum(plan_r[:p]), sum(plan_r[:p + 1]), plan_blocks[p - 1], plan_blocks[p], plan_r[p])
            for q in range(p):
                if plan_r[q] == 0:
                    continue
                for row in range(plan_blocks[p - 1], plan_blocks[p]):
                    fill(row, sum(plan_r[:q]), sum(plan_r[:q + 1]), plan_blocks[q - 1] if q > 0 else 0,
                         plan_blocks[q], plan_r[q])
        if plan_r[p] == 0:
            continue
        first = plan_blocks[p - 1] if p > 0 else 1
        for row in range(first, plan_blocks[p]):
            fill(row, sum(plan_r[:p]), sum(plan_r[:p + 1]), plan_blocks[p - 1] if p > 0 else 0, plan_blocks[p],
                 plan_r[p])
    return rand[:, 1:-1]


def _rand_paper_plan(rs, max_length: int, block_size: int, r: int, last_idx: int) -> np.ndarray:
    """transformers' `_bigbird_block_rand_mask` (the paper's plan for lengths 1024, 3072, 4096) -> [nb_max - 2, r]."""
    blocks = max_length // block_size
    rand = np.zeros((blocks - 2, r), np.int32)
    middle = np.arange(1, blocks - 1, dtype=np.int32)
    last = last_idx // block_size - 1 if last_idx > 2 * block_size else blocks - 1
    for i in range(1, blocks - 1):
        start, end = i - 2, i
        if i == 1:
            choices = middle[2:last]
        elif i == 2:
            choices = middle[3:last]
        elif i in (blocks - 3, blocks - 2):
            choices = middle[:last]
        elif start > last:
            choices = middle[:last]
        elif end + 1 == last:
            choices = middle[:start]
        else:
            choices = np.concatenate((middle[:start], middle[end + 1:last]))
        rand[i - 1] = rs.permutation(choices)[:r]
    return rand


def random_blocks(config: BigBirdConfig, length: int, layer: int, training: bool) -> np.ndarray:
    """[N, nb - 2, r] int32: the random key blocks of query blocks 1 .. nb-2 in layer `layer`, as transformers 5
    picks them: zeros in evaluation; in training NumPy's legacy generator seeded with the layer index."""
    bs, heads, r = config.block_size, config.num_attention_heads, config.num_random_blocks
    blocks = length // bs
    if not training:
        return np.zeros((heads, blocks - 2, r), np.int32)
    rs = np.random.RandomState(layer)  # the stream of transformers' np.random.seed(layer) + np.random.permutation
    if length in (1024, 3072, 4096):
        return np.stack([_rand_paper_plan(rs, config.max_position_embeddings, bs, r, 1024)[:blocks - 2]
                         for _ in range(heads)])
    return _rand_with_head(rs, length, bs, heads, r)


def key_blocks(config: BigBirdConfig, length: int, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """(blocks [L, N, nb - 2, K] int32, valid [nb - 2, K] bool): the key blocks that query block i (1 .. nb-2)
    attends to: 0, i-1, i, i+1, nb-1, then the random ones. Query blocks 1 and nb-2 have one fewer (their window meets
    a global block): slot 4 is a masked filler."""
    blocks = length // config.block_size
    rows = np.arange(1, blocks - 1)
    fixed = np.stack([np.zeros_like(rows), rows - 1, rows, rows + 1, np.full_like(rows, blocks - 1)], axis=1)
    fixed[0] = 0, 1, 2, blocks - 1, 0  # query block 1 (block nb-2 is already 0, nb-3, nb-2, nb-1 and a filler nb-1)
    valid = np.ones((blocks - 2, 5 + config.num_random_blocks), bool)
    valid[[0, -1], 4] = False
    table = [np.concatenate([np.broadcast_to(fixed, (config.num_attention_heads, *fixed.shape)),
                             random_blocks(config, length, layer, training)], axis=2)
             for layer in range(config.num_hidden_layers)]
    return np.stack(table).astype(np.int32), valid


def block_sparse_attention(q, k, v, mask, blocks, valid, block_size: int):
    """q, k, v [B, T, N, H] (T a multiple of block_size); mask [B, T] bool (True = token); blocks [N, nb - 2, K] and
    valid [nb - 2, K] (see key_blocks) -> [B, T, N, H], zero at masked queries."""
    b, length, heads, size = q.shape
    nb, bs = length // block_size, block_size
    to_bias = jnp.where(mask, 0.0, _PENALTY).astype(jnp.float32)
    # Query blocks 0 and nb-1 are global: they attend to every key.
    ends = attention(jnp.concatenate([q[:, :bs], q[:, -bs:]], axis=1), k, v, bias=to_bias[:, None, None, :])

    # The others attend to their K key blocks, gathered per head: [N, B, nb - 2, K, bs, ...].
    def gather(x):
        return jax.vmap(lambda xh, idx: xh[:, idx])(x, blocks)

    def heads_last(x):  # [N, B, nb - 2, K, bs, H] -> [B * (nb - 2), K * bs, N, H]
        return x.transpose(1, 2, 3, 4, 0, 5).reshape(b * (nb - 2), -1, heads, size)

    kb, vb = (x.reshape(b, nb, bs, heads, size).transpose(3, 0, 1, 2, 4) for x in (k, v))
    keys = gather(mask.reshape(b, nb, bs)[None].repeat(heads, 0)) & valid[None, None, :, :, None]
    bias = jnp.where(keys, 0.0, _PENALTY).astype(jnp.float32)  # [N, B, nb - 2, K, bs]
    bias = bias.transpose(1, 2, 0, 3, 4).reshape(b * (nb - 2), heads, 1, -1)
    middle = attention(q[:, bs:-bs].reshape(b * (nb - 2), bs, heads, size), heads_last(gather(kb)),
                       heads_last(gather(vb)), bias=bias).reshape(b, -1, heads, size)
    out = jnp.concatenate([ends[:, :bs], middle, ends[:, bs:]], axis=1)
    return out * mask[:, :, None, None].astype(out.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Modules


class BigBirdEmbeddings(bert.BertEmbeddings):
    """BERT's embeddings (same params), optionally rescaled by D**0.5, with dropout before the LayerNorm."""

    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        """[B, T] ids, [B, T] segment ids -> [B, T, D]."""
        cfg = self.config
        x = self.word_embeddings(input_ids)
        if cfg.rescale_embeddings:
            x = x * cfg.hidden_size**0.5
        x = x + self.token_type_embeddings(token_type_ids) + self.position_embeddings(
            bert.position_ids(input_ids, cfg))
        return self.LayerNorm(self.dropout(x, deterministic=deterministic))


class BigBirdSelfAttention(nn.Module):
    config: BigBirdConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, blocks, valid, deterministic: bool):
        """x [B, T, D]; mask [B, T] bool; blocks None (full attention) or this layer's [N, nb - 2, K] -> [B, T, D]."""
        cfg = self.config
        q, k, v = (nn.Dense(cfg.hidden_size, use_bias=cfg.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
                            name=name, **dense_inits(cfg.initializer_range, (EMBED, HEADS)))(x)
                   .reshape(*x.shape[:2], cfg.num_attention_heads, cfg.head_dim)
                   for name in ("query", "key", "value"))
        if blocks is None:
            out = attention(q, k, v, mask[:, None, None, :], dropout_rate=cfg.attention_probs_dropout_prob,
                            deterministic=deterministic)
        else:  # transformers' block-sparse attention has no dropout
            out = block_sparse_attention(q, k, v, mask, blocks, valid, cfg.block_size)
        return out.reshape(*x.shape[:2], cfg.hidden_size)


class BigBirdAttention(nn.Module):
    """`self` (full or block-sparse attention) and `output` (dense, dropout, LayerNorm with the residual)."""

    config: BigBirdConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, blocks, valid, deterministic: bool):
        h = BigBirdSelfAttention(self.config, self.dtype, name="self")(x, mask, blocks, valid, deterministic)
        return bert.BertOutput(self.config, self.dtype, name="output")(h, x, deterministic)


class BigBirdLayer(nn.Module):
    """One encoder block, (carry, inputs) -> (carry, None) as nn.scan wants it; `blocks` is this layer's slice."""

    config: BigBirdConfig
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask, valid=None, blocks=None):
        cfg, det = self.config, self.deterministic
        x = BigBirdAttention(cfg, self.dtype, name="attention")(x, mask, blocks, valid, det)
        h = bert.BertIntermediate(cfg, self.dtype, name="intermediate")(x)
        return bert.BertOutput(cfg, self.dtype, bert.MLP, name="output")(h, x, det), None


class BigBirdEncoder(nn.Module):
    config: BigBirdConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        """x [B, T, D], mask [B, T] bool -> [B, T, D]: block-sparse when T allows it (then T is a multiple of
        block_size), else full attention; params of `layer` stacked [L, ...]."""
        cfg = self.config
        if cfg.uses_block_sparse(x.shape[1]):
            blocks, valid = key_blocks(cfg, x.shape[1], training=not deterministic)
            layers = scan_layers(BigBirdLayer, cfg.num_hidden_layers, self.gradient_checkpointing,
                                 in_axes=(nn.broadcast, nn.broadcast, 0))
            return layers(cfg, self.dtype, deterministic, name="layer")(x, mask, valid, blocks)[0]
        layers = scan_layers(BigBirdLayer, cfg.num_hidden_layers, self.gradient_checkpointing)
        return layers(cfg, self.dtype, deterministic, name="layer")(x, mask)[0]


class BigBirdModel(nn.Module):
    """The body: embeddings, encoder, pooler (a bare Dense, `bert.pooler`)."""

    config: BigBirdConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    def setup(self):
        cfg = self.config
        self.embeddings = BigBirdEmbeddings(cfg, self.dtype)
        self.encoder = BigBirdEncoder(cfg, self.dtype, self.gradient_checkpointing)
        self.pooler = nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                               **dense_inits(cfg.initializer_range, (EMBED, EMBED)))

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: [B, T] ints
        -> (hidden [B, T, D], pooled [B, D])."""
        cfg, length = self.config, input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if cfg.attention_type == "block_sparse" and not cfg.uses_block_sparse(length):
            logger.warning(
                "Attention type 'block_sparse' is not possible if sequence_length: %d <= num global tokens: "
                "2 * config.block_size + min. num sliding tokens: 3 * config.block_size + config.num_random_blocks "
                "* config.block_size + additional buffer: config.num_random_blocks * config.block_size = %d with "
                "config.block_size = %d, config.num_random_blocks = %d. Changing attention type to "
                "'original_full'...", length, (5 + 2 * cfg.num_random_blocks) * cfg.block_size, cfg.block_size,
                cfg.num_random_blocks)
        elif cfg.uses_block_sparse(length) and length % cfg.block_size:
            pad = -length % cfg.block_size
            logger.warning("Input ids are automatically padded from %d to %d to be a multiple of `config.block_size`: "
                           "%d", length, length + pad, cfg.block_size)
            widen = lambda x, value: jnp.pad(x, ((0, 0), (0, pad)), constant_values=value)  # noqa: E731
            input_ids, attention_mask = widen(input_ids, cfg.pad_token_id), widen(attention_mask, 0)
            token_type_ids = widen(token_type_ids, 0)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        x = self.encoder(x, attention_mask.astype(bool), deterministic)
        return x[:, :length], jnp.tanh(self.pooler(x[:, 0]))

    def word_embedding_matrix(self):
        """[V, D] float32: the MLM decoder's weights (tied to the input embeddings)."""
        return self.embeddings.word_embeddings.embedding


class BigBirdForMaskedLM(nn.Module):
    """BigBird with BERT's MLM head (`cls.predictions`, decoder tied to the word embeddings)."""

    config: BigBirdConfig
    dtype: Any = jnp.float32  # computation dtype; params are always float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "BigBirdForMaskedLM"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True, positions=None):
        """[B, T] int inputs -> logits [B, T, V] float32, or [B, K, V] at `positions` [B, K] (the masked tokens).
        Dropout needs the "dropout" rng when not deterministic."""
        body = BigBirdModel(self.config, self.dtype, self.gradient_checkpointing, name="bert")
        hidden, _ = body(input_ids, attention_mask, token_type_ids, deterministic)
        return bert.BertOnlyMLMHead(self.config, self.dtype, name="cls")(
            bert.at_positions(hidden, positions), body.word_embedding_matrix())


class BigBirdForSequenceClassification(nn.Module):
    """BigBird with RoBERTa's classifier on the first token (`classifier.{dense,out_proj}`), hidden_act for tanh."""

    config: BigBirdConfig
    dtype: Any = jnp.float32
    gradient_checkpointing: bool = False

    @property
    def hf_architecture(self) -> str:
        return "BigBirdForSequenceClassification"

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """[B, T] int inputs -> logits [B, num_labels] float32."""
        cfg = self.config
        hidden, _ = BigBirdModel(cfg, self.dtype, self.gradient_checkpointing, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic)
        head = bert.RobertaClassificationHead(cfg, self.dtype, activation=bert.ACT_FNS[cfg.hidden_act],
                                              name="classifier")
        return head(hidden, deterministic).astype(jnp.float32)


@contextlib.contextmanager
def _quiet():
    """No warning that init's 2 tokens are too short for block-sparse attention (the params are the same)."""
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def init_params(module: nn.Module, rng: jax.Array, unbox: bool = True) -> dict:
    """Fresh float32 params of a model above (normal(initializer_range) weights, as transformers). Jitted; under
    `jax.eval_shape(functools.partial(init_params, module), rng)` it allocates nothing. unbox=False keeps flax's
    LogicallyPartitioned boxes (the logical axis names, for parallel.shardings)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    with _quiet():
        params = jax.jit(module.init)({"params": rng}, ids, jnp.ones_like(ids))["params"]
    return nn.unbox(params) if unbox else params


# What flaxtrain.models.create, the scripts and flaxtrain.hf_io use (see models/family.py).
FAMILY = Family(
    model_types=BigBirdConfig.MODEL_TYPES, config=BigBirdConfig,
    heads={"MaskedLM": BigBirdForMaskedLM, "SequenceClassification": BigBirdForSequenceClassification},
    init_params=init_params, max_positions=bert.max_positions,
    hf=HfRules(
        scanned=("encoder.layer",),
        tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
              "cls.predictions.decoder.bias": "cls.predictions.bias"},
        base_prefix={"big_bird": "bert"},
        # Hub checkpoints (BigBirdForPreTraining) carry the MLM and next-sentence heads; every head has the pooler.
        pretraining_heads=(r"^cls\.",),
        classifier_head=(r"^classifier\.", r"^bert\.pooler\."),
    ),
)

"""Marian (the Helsinki-NLP/opus-mt-* translation models) as a BART-like encoder-decoder: the layers of
`flaxtrain.models.bart`, post-norm as BART's, with sinusoidal positions, scaled token embeddings and no
layernorm_embedding. (Pegasus, flaxtrain/models/pegasus.py, has the same positions.)

The sinusoidal table is the one transformers computes (`MarianSinusoidalPositionalEmbedding.create_weight`); Marian
checkpoints never carry it (transformers 5 leaves it out on save and ignores it on load), so here it is a constant,
and an old checkpoint's copy is ignored on load. transformers counts it among the model's parameters (frozen): our
param count is theirs less 2 P x D.

Only shared vocabularies: a config with share_encoder_decoder_embeddings=False (the decoder's own embedding and
vocabulary, decoder_vocab_size) is refused.

Shapes: T positions, D d_model, P max_position_embeddings.
"""

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxtrain.models import bart
from flaxtrain.models.family import Family
from flaxtrain.models.partitioning import EMBED, POSITIONS, named


@functools.lru_cache(maxsize=8)
def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """[P, D] float32, as transformers' Marian/Pegasus `create_weight`: angles p / 10000**(2 * (j // 2) / D) in
    float64, the sines of the even j in the first ceil(D / 2) columns, the cosines of the odd j after them (not
    interleaved)."""
    j = np.arange(dim)
    angles = np.arange(num_positions)[:, None] / np.power(10000, 2 * (j // 2) / dim)
    sentinel = (dim + 1) // 2
    table = np.empty((num_positions, dim), np.float32)
    table[:, :sentinel] = np.sin(angles[:, 0::2])
    table[:, sentinel:] = np.cos(angles[:, 1::2])
    table.setflags(write=False)  # shared by every caller (cached)
    return table


class SinusoidalPositions(nn.Module):
    """positions [T] -> [T, D]. With `saved` (Pegasus, whose checkpoints carry the table as
    `embed_positions.weight`) the table is a param initialised to the sinusoids, read through stop_gradient and
    named `weight`, not `embedding`, so that training.decay_mask does not shrink it either; else a constant."""

    config: bart.BartConfig
    dtype: Any = jnp.float32
    saved: bool = False

    @nn.compact
    def __call__(self, positions):
        shape = (self.config.max_position_embeddings, self.config.d_model)
        if self.saved:
            init = named(lambda rng, shape, dtype=jnp.float32: jnp.asarray(sinusoidal_table(*shape), dtype),
                         POSITIONS, EMBED)
            table = jax.lax.stop_gradient(self.param("weight", init, shape, jnp.float32))
        else:
            table = jnp.asarray(sinusoidal_table(*shape))
        return jnp.take(table, positions, axis=0).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class MarianConfig(bart.BartConfig):
    """A Hugging Face Marian `config.json`'s fields (defaults: opus-mt-en-de) and Marian's layout."""

    vocab_size: int = 58101
    max_position_embeddings: int = 512
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "swish"
    scale_embedding: bool = True
    pad_token_id: int = 58100
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 0
    decoder_start_token_id: int | None = 58100
    forced_eos_token_id: int | tuple[int, ...] | None = 0
    model_type: str = "marian"
    normalize_before: bool | None = False
    add_final_layer_norm: bool | None = False
    layernorm_embedding: bool = False
    learned_positions: bool = False
    position_offset: int = 0

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("marian",)
    POSITIONS: ClassVar[type | None] = SinusoidalPositions

    @classmethod
    def from_hf(cls, hf_config: Any, generation_config: Any = None) -> "MarianConfig":
        """From a transformers `MarianConfig` (see bart.BartConfig.from_hf); refuses separate decoder vocabularies."""
        decoder_vocab = getattr(hf_config, "decoder_vocab_size", None)
        unsupported = [name for name, bad in [
            ("share_encoder_decoder_embeddings=False",
             not getattr(hf_config, "share_encoder_decoder_embeddings", True)),
            (f"decoder_vocab_size={decoder_vocab}", decoder_vocab not in (None, hf_config.vocab_size)),
        ] if bad]
        if unsupported:
            raise ValueError(f"marian config has unsupported settings: {', '.join(unsupported)} (only a vocabulary "
                             "shared by the encoder and the decoder is implemented)")
        return super().from_hf(hf_config, generation_config)


FAMILY = Family(
    model_types=MarianConfig.MODEL_TYPES, config=MarianConfig, heads={"Seq2SeqLM": bart.BartForConditionalGeneration},
    init_params=bart.init_params, max_positions=bart.max_positions, shift_right=bart.FAMILY.shift_right,
    # Old checkpoints may carry the sinusoidal tables: they are the constants we compute.
    hf=bart.hf_rules(MarianConfig.MODEL_TYPES, ignored=(r"^model\.(encoder|decoder)\.embed_positions\.weight$",)),
)

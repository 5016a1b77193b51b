"""Pegasus (google/pegasus-*) as a BART-like encoder-decoder: the layers of `flaxtrain.models.bart`, pre-norm with
a final `layer_norm` after each stack (as mBART), sinusoidal positions (Marian's, flaxtrain/models/marian.py), no
layernorm_embedding; its checkpoints scale the token embeddings (scale_embedding in config.json).

Unlike Marian's, Pegasus checkpoints carry the sinusoidal tables (`model.{encoder,decoder}.embed_positions.weight`,
which transformers 5 saves and reports missing when absent), so here they are frozen params initialised to the
table transformers computes: saved, loaded, never trained.
"""

import dataclasses
import functools
from typing import ClassVar

from flaxtrain.models import bart, marian
from flaxtrain.models.family import Family


@dataclasses.dataclass(frozen=True)
class PegasusConfig(bart.BartConfig):
    """A Hugging Face Pegasus `config.json`'s fields (defaults: pegasus-large) and Pegasus's layout."""

    vocab_size: int = 96103
    activation_function: str = "relu"
    scale_embedding: bool = True
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 1
    decoder_start_token_id: int | None = 0
    forced_eos_token_id: int | tuple[int, ...] | None = 1
    model_type: str = "pegasus"
    normalize_before: bool | None = True
    add_final_layer_norm: bool | None = True
    layernorm_embedding: bool = False
    learned_positions: bool = False
    position_offset: int = 0

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("pegasus",)
    POSITIONS: ClassVar[type | None] = functools.partial(marian.SinusoidalPositions, saved=True)


FAMILY = Family(
    model_types=PegasusConfig.MODEL_TYPES, config=PegasusConfig,
    heads={"Seq2SeqLM": bart.BartForConditionalGeneration}, init_params=bart.init_params,
    max_positions=bart.max_positions, shift_right=bart.FAMILY.shift_right, hf=bart.hf_rules(PegasusConfig.MODEL_TYPES),
)

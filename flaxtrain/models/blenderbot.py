"""Blenderbot and BlenderbotSmall (facebook/blenderbot-*, facebook/blenderbot_small-90M) as BART-like
encoder-decoders: the layers of `flaxtrain.models.bart` with learned positions that start at row 0 (no BART offset).

Blenderbot is pre-norm with a final `layer_norm` after each stack and no layernorm_embedding; BlenderbotSmall is
post-norm with a `layernorm_embedding`, which its encoder applies to token embeddings + positions (as BART) but its
decoder to the token embeddings alone, adding the positions after it (as transformers does).
"""

import dataclasses
from typing import ClassVar

from flaxtrain.models import bart
from flaxtrain.models.family import Family


@dataclasses.dataclass(frozen=True)
class BlenderbotConfig(bart.BartConfig):
    """A Hugging Face Blenderbot or BlenderbotSmall `config.json`'s fields (defaults: blenderbot-400M-distill); the
    layout follows model_type."""

    vocab_size: int = 8008
    max_position_embeddings: int = 128
    d_model: int = 1280
    encoder_layers: int = 2
    decoder_layers: int = 12
    encoder_attention_heads: int = 32
    decoder_attention_heads: int = 32
    encoder_ffn_dim: int = 5120
    decoder_ffn_dim: int = 5120
    scale_embedding: bool = True
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    decoder_start_token_id: int | None = 1
    model_type: str = "blenderbot"
    position_offset: int = 0
    layernorm_embedding: bool | None = None  # None: as model_type says (below)
    decoder_norms_tokens: bool | None = None

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("blenderbot", "blenderbot-small")

    def __post_init__(self):
        small = self.model_type == "blenderbot-small"
        layout = dict(normalize_before=not small, add_final_layer_norm=not small, layernorm_embedding=small,
                      decoder_norms_tokens=small)
        for name, value in layout.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        super().__post_init__()


FAMILY = Family(
    model_types=BlenderbotConfig.MODEL_TYPES, config=BlenderbotConfig,
    heads={"Seq2SeqLM": bart.BartForConditionalGeneration}, init_params=bart.init_params,
    max_positions=bart.max_positions, shift_right=bart.FAMILY.shift_right,
    hf=bart.hf_rules(BlenderbotConfig.MODEL_TYPES),
)

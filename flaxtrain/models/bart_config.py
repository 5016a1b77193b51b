"""The configuration of BART and every BART-like family (flaxtrain/models/bart.py, pegasus.py, marian.py,
blenderbot.py), the decoder-input shifts that transformers' BART and mBART apply, and the rules of their
checkpoints' keys (hf_rules).

Special token ids (`BartConfig` fields, read with getattr): transformers 5 keeps pad/bos/eos/decoder_start/
forced_eos_token_id in the model config, but drops `forced_bos_token_id` (a generation setting) from config.json on
load: it lives in a checkpoint's generation_config.json (e.g. bart-large-cnn's forced_bos_token_id=0, mbart-50's
target language). Pass `GenerationConfig.from_pretrained(...)` to `BartConfig.from_hf` to take those (its non-None
ids win). As transformers' `generate`, a missing decoder_start_token_id (mBART's default) falls back to bos_token_id.
"""

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from flaxtrain.models import t5
from flaxtrain.models.bert import ACT_FNS
from flaxtrain.models.family import HfRules

# {model_type: transformers' class with the LM head}, for every BART-like model type.
HF_ARCHITECTURES = {"bart": "BartForConditionalGeneration", "mbart": "MBartForConditionalGeneration",
                     "pegasus": "PegasusForConditionalGeneration", "marian": "MarianMTModel",
                     "blenderbot": "BlenderbotForConditionalGeneration",
                     "blenderbot-small": "BlenderbotSmallForConditionalGeneration"}
# Offset of BART's learned positions (fairseq reserved the first two rows): position p reads row p + 2.
POSITION_OFFSET = 2
# Settings of old (transformers 3) BART config.json files that still travel with Hub checkpoints, and the values
# this model (and transformers 5, which ignores them) implements; normalize_before and add_final_layer_norm are
# the mBART switches, checked against model_type. (The other model types' Hub configs carry them too, describing
# their fixed layouts in transformers 3's terms; their transformers 5 classes, and we, ignore them.)
_LEGACY_SETTINGS = {"add_bias_logits": False, "normalize_embedding": True, "static_position_embeddings": False,
                    "extra_pos_embeddings": POSITION_OFFSET}


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """The fields of a Hugging Face BART/mBART `config.json` that the model uses (defaults: bart-large), and the
    layout fields; the variants' configs subclass it."""

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    decoder_start_token_id: int | None = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | tuple[int, ...] | None = 2
    model_type: str = "bart"
    num_labels: int = 2  # the sequence classifier's
    classifier_dropout: float = 0.0
    layer_norm_eps: float = 1e-5  # not in config.json: torch.nn.LayerNorm's default, which BART uses
    # The layout (not config.json's: what each transformers class hard-codes; the variants' configs set theirs).
    # None: mBART's for model_type "mbart", else BART's.
    normalize_before: bool | None = None  # pre-norm blocks
    add_final_layer_norm: bool | None = None  # a `layer_norm` after each stack's last layer
    layernorm_embedding: bool = True  # a `layernorm_embedding` after the embeddings
    decoder_norms_tokens: bool = False  # the decoder's layernorm_embedding before the positions are added
    learned_positions: bool = True  # else the POSITIONS module's (the variants' sinusoidal ones)
    position_offset: int = POSITION_OFFSET  # learned positions: the row of position 0

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("bart", "mbart")
    POSITIONS: ClassVar[type | None] = None  # a module (config, dtype): positions [T] -> [T, D]
    LAYOUT: ClassVar[tuple[str, ...]] = ("normalize_before", "add_final_layer_norm", "layernorm_embedding",
                                         "decoder_norms_tokens", "learned_positions", "position_offset")

    def __post_init__(self):
        if self.model_type not in self.MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {type(self).__name__}'s: "
                             f"{list(self.MODEL_TYPES)}")
        for name in ("normalize_before", "add_final_layer_norm"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.model_type == "mbart")
        for name in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.decoder_start_token_id is None:  # as transformers' generate: mBART starts from bos
            object.__setattr__(self, "decoder_start_token_id", self.bos_token_id)
        if self.activation_function not in ACT_FNS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{sorted(ACT_FNS)}")
        for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not a multiple of {heads} heads")

    @classmethod
    def from_hf(cls, hf_config: Any, generation_config: Any = None) -> "BartConfig":
        """From a transformers `BartConfig`/`MBartConfig` (the variants': theirs) and optionally a `GenerationConfig`,
        whose special token ids then win; raises ValueError on settings this model lacks."""
        model_type = hf_config.model_type
        if model_type not in cls.MODEL_TYPES:
            raise ValueError(f"{model_type} is not a config of {cls.__name__} ({', '.join(cls.MODEL_TYPES)})")
        checks = [
            ("is_decoder=True", getattr(hf_config, "is_decoder", False)),
            ("is_encoder_decoder=False", not getattr(hf_config, "is_encoder_decoder", True)),
            ("tie_word_embeddings=False", not getattr(hf_config, "tie_word_embeddings", True)),
            ("encoder_layerdrop > 0", getattr(hf_config, "encoder_layerdrop", 0) or 0),
            ("decoder_layerdrop > 0", getattr(hf_config, "decoder_layerdrop", 0) or 0),
            ("pad_token_id=None", getattr(hf_config, "pad_token_id", None) is None),
        ]
        if model_type in ("bart", "mbart"):
            is_mbart = model_type == "mbart"
            checks += [
                *((f"{name}={getattr(hf_config, name, value)!r}", getattr(hf_config, name, value) != value)
                  for name, value in _LEGACY_SETTINGS.items()),
                *((f"{name}={getattr(hf_config, name, is_mbart)!r} with model_type {model_type!r}",
                   getattr(hf_config, name, is_mbart) != is_mbart)
                  for name in ("normalize_before", "add_final_layer_norm"))]
        unsupported = [name for name, bad in checks if bad]
        if unsupported:
            raise ValueError(f"{model_type} config has unsupported settings: {', '.join(unsupported)}")
        values = {f.name: getattr(hf_config, f.name, None) for f in dataclasses.fields(cls)
                  if f.name not in cls.LAYOUT}
        # Keyword arguments, not defaults: a token id that is None in the config stays None.
        token_ids = ("bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id",
                     "forced_eos_token_id")
        for name in token_ids:
            if generation_config is not None and getattr(generation_config, name, None) is not None:
                values[name] = getattr(generation_config, name)
        return cls(**{name: value for name, value in values.items() if value is not None or name in token_ids})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads


def max_positions(config: BartConfig) -> int:
    """The longest encoder (or decoder) input the positions cover (BART's table has 2 more rows: the offset)."""
    return config.max_position_embeddings


def shift_tokens_right(labels, pad_token_id: int, decoder_start_token_id: int):
    """labels [B, T] -> decoder_input_ids [B, T]: decoder_start_token_id, then labels[:, :-1]; -100 becomes
    pad_token_id. NumPy in, NumPy out; jax in, jax out. (transformers' BART helper and argument order; mBART's own
    helper, which starts from each row's last non-pad token, the language id, is `mbart_shift_tokens_right`.)"""
    return t5.shift_right(labels, decoder_start_token_id, pad_token_id)


def mbart_shift_tokens_right(input_ids, pad_token_id: int):
    """transformers' mBART shift, which its models apply to input_ids when given no decoder input (the classifier,
    the masked LM): [B, T] -> [B, T], each row's last non-pad token (the language id; rows padded on the right),
    then input_ids[:, :-1]."""
    xp = np if isinstance(input_ids, np.ndarray) else jnp
    ids = xp.where(input_ids == -100, pad_token_id, input_ids)
    last = (ids != pad_token_id).sum(axis=1, keepdims=True) - 1
    start = xp.take_along_axis(ids, xp.maximum(last, 0), axis=1)  # (an all-pad row starts from pad)
    return xp.concatenate([start, ids[:, :-1]], axis=1)


def shift_input_ids(config: BartConfig, input_ids):
    """The decoder input transformers' models make of input_ids when given none (see the two helpers above)."""
    if config.model_type == "mbart":
        return mbart_shift_tokens_right(input_ids, config.pad_token_id)
    return shift_tokens_right(input_ids, config.pad_token_id, config.decoder_start_token_id)


def hf_rules(model_types: tuple[str, ...], ignored: tuple[str, ...] = ()) -> HfRules:
    """The checkpoint-key rules of a BART-like family (its own `ignored` buffers added)."""
    return HfRules(
        scanned=("encoder.layers", "decoder.layers"),
        tied={"model.encoder.embed_tokens.weight": "model.shared.weight",
              "model.decoder.embed_tokens.weight": "model.shared.weight", "lm_head.weight": "model.shared.weight"},
        # A bare-body checkpoint (AutoModel) lacks the `model.` prefix and final_logits_bias.
        base_prefix=dict.fromkeys(model_types, "model"),
        # fairseq-converted checkpoints carry version buffers (transformers ignores them too).
        ignored=(r"^model\.(encoder|decoder)\.version$", *ignored),
        # Absent from bare-body checkpoints: zeros, as transformers initialises the buffer.
        zeros=(r"^final_logits_bias$",),
        # A classifier from a conditional-generation checkpoint: its LM head's bias unused, its own head fresh.
        pretraining_heads=(r"^final_logits_bias$",),
        classifier_head=(r"^classification_head\.",),
    )

"""One record per model family: what the scripts, `models.create` and `flaxtrain.hf_io` need to know about it.

Each family file (bert.py, gpt2.py, ...) ends with `FAMILY = Family(...)`; `flaxtrain.models.FAMILIES` maps every
Hugging Face `model_type` to one of them. Everything a caller may use is a field here, so nothing probes a module for
optional names.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# The generic rule for a param's last name: flax's `kernel` (a Dense, transposed), `embedding` and `scale` are the
# checkpoint's `weight`; every other leaf keeps its name (`bias`, ...).
LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


@dataclasses.dataclass(frozen=True)
class HfRules:
    """A family's checkpoint-key rules for `flaxtrain.hf_io` (patterns are regexes over checkpoint keys), beyond the
    generic ones (path components joined with ".", `kernel` -> `weight` transposed, one key per scanned layer)."""

    # Module paths whose params are stacked over layers by nn.scan: one checkpoint key per layer.
    scanned: tuple[str, ...] = ()
    # {key: source}: checkpoint keys that copy another weight (transformers' `_tied_weights_keys`): never saved,
    # checked equal to the source and dropped on load.
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # {model_type: the body's prefix} (transformers' `base_model_prefix`): checkpoints of the bare model
    # (AutoModel) lack it.
    base_prefix: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Keys whose `kernel` is stored [in, out] as flax has it (e.g. GPT-2's Conv1D), so not transposed.
    untransposed: tuple[str, ...] = ()
    # Buffers that old checkpoints carry and the model does not use: dropped on load.
    ignored: tuple[str, ...] = ()
    # {params path prefix: checkpoint key prefix} for params that sit elsewhere in the checkpoint (e.g. T5's shared
    # position bias, kept outside the scanned blocks but saved in block 0).
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Buffers that some checkpoints lack and that load as zeros then, as transformers initialises them.
    zeros: tuple[str, ...] = ()
    # Keys a classifier leaves unused (`drop=` of hf_io.load_pretrained): the pretraining heads of Hub checkpoints.
    pretraining_heads: tuple[str, ...] = ()
    # Template params a classifier initialises when the checkpoint lacks them (`fresh=` of hf_io.load_pretrained).
    classifier_head: tuple[str, ...] = ()


# eq=False: a family is one object, compared (and hashed, e.g. in a set) by identity; its dicts are not hashable.
@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """A model family: its model types, config class, heads, init and checkpoint rules."""

    model_types: tuple[str, ...]  # the Hugging Face `model_type`s it implements
    config: type  # the config dataclass, with `from_hf(hf_config)`
    heads: Mapping[str, type]  # task -> module class: "MaskedLM", "CausalLM", "Seq2SeqLM", "SequenceClassification"
    init_params: Callable[..., dict]  # init_params(module, rng, unbox=True) -> params
    # max_positions(config) -> the longest input the positions cover; None: positions are unlimited (T5's relative).
    max_positions: Callable[[Any], int] | None
    hf: HfRules
    # Encoder-decoders: shift_right(labels, decoder_start_token_id, pad_token_id) -> decoder_input_ids [B, T].
    shift_right: Callable[..., Any] | None = None

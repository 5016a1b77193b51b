"""Model families, looked up by the Hugging Face `model_type` of a config."""

import flax.linen as nn

from flaxtrain.models import (albert, bart, bert, big_bird, blenderbot, bloom, deberta_v2, distilbert, electra, gemma,
                              gpt2, gpt_neo, gptj, llama, longt5, marian, modernbert, opt, pegasus, phi3,
                              roberta_prelayernorm, roformer, t5, xglm)
from flaxtrain.models.family import Family

# model_type -> the family record that implements it (its config, heads, init and checkpoint-key rules).
FAMILIES: dict[str, Family] = {model_type: family
                               for family in (
                                   # encoders
                                   bert.FAMILY, roberta_prelayernorm.FAMILY, albert.FAMILY, electra.FAMILY,
                                   distilbert.FAMILY, big_bird.FAMILY, roformer.FAMILY, deberta_v2.FAMILY,
                                   modernbert.FAMILY,
                                   # decoders
                                   gpt2.FAMILY, gpt_neo.FAMILY, gptj.FAMILY, opt.FAMILY, bloom.FAMILY, xglm.FAMILY,
                                   llama.FAMILY, phi3.FAMILY, gemma.FAMILY,
                                   # encoder-decoders
                                   t5.FAMILY, longt5.FAMILY, bart.FAMILY, pegasus.FAMILY, marian.FAMILY,
                                   blenderbot.FAMILY)
                               for model_type in family.model_types}


def get_family(model_type: str) -> Family:
    """The family record of a Hugging Face `model_type` (e.g. "roberta" -> `flaxtrain.models.bert.FAMILY`)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}"
        ) from None


def create(hf_config, head: str, **options) -> tuple[Family, nn.Module]:
    """(family record, Flax module) of `head` ("MaskedLM", "CausalLM", ...) for a Hugging Face config.

    `options` go to the module (dtype, gradient_checkpointing). A model type without that head is an error that
    lists the model types that have it.
    """
    family = FAMILIES.get(hf_config.model_type)
    if family is None or head not in family.heads:
        supported = ", ".join(sorted(t for t, f in FAMILIES.items() if head in f.heads))
        raise ValueError(f"model_type {hf_config.model_type!r} is not supported for this task; supported model "
                         f"types: {supported}")
    return family, family.heads[head](family.config.from_hf(hf_config), **options)

"""Model families, looked up by the Hugging Face `model_type` of a config."""

from types import ModuleType

from flaxtrain.models import bart, bert, distilbert, electra, gpt2, llama, t5

# model_type -> the module that implements it (its config, heads and checkpoint-key rules).
FAMILIES: dict[str, ModuleType] = {"bert": bert, "roberta": bert, "electra": electra, "distilbert": distilbert,
                                   "gpt2": gpt2, "llama": llama, "mistral": llama, "qwen2": llama, "t5": t5, "mt5": t5,
                                   "bart": bart, "mbart": bart}


def get_family(model_type: str) -> ModuleType:
    """The family module for a Hugging Face `model_type` (e.g. "roberta" -> `flaxtrain.models.bert`)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}"
        ) from None


def create(hf_config, head: str, **options):
    """(family module, Flax module) of `head` ("MaskedLM", "CausalLM", ...) for a Hugging Face config.

    `options` go to the module (dtype, gradient_checkpointing). A model type without that head is an error that
    lists the model types that have it.
    """
    family = FAMILIES.get(hf_config.model_type)
    if family is None or not hasattr(family, head):
        supported = ", ".join(sorted(t for t, f in FAMILIES.items() if hasattr(f, head)))
        raise ValueError(f"model_type {hf_config.model_type!r} is not supported for this task; supported model "
                         f"types: {supported}")
    return family, getattr(family, head)(family.Config.from_hf(hf_config), **options)

"""Model families, looked up by the Hugging Face `model_type` of a config."""

from types import ModuleType

from flaxtrain.models import bert

# model_type -> the module that implements it (its config, heads and checkpoint-key rules).
FAMILIES: dict[str, ModuleType] = {"bert": bert, "roberta": bert}


def get_family(model_type: str) -> ModuleType:
    """The family module for a Hugging Face `model_type` (e.g. "roberta" -> `flaxtrain.models.bert`)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}"
        ) from None

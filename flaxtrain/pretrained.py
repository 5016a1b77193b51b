"""Configs and tokenizers through the ordinary transformers paths (Hub names or local folders), and model folders
in a bucket (gs://...), which are copied to a local folder first."""

import contextlib
import functools
import os
import tempfile

import jax.numpy as jnp
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from flaxtrain import storage

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _hub_kwargs(source):
    return dict(cache_dir=source.cache_dir, revision=source.revision, token=source.token,
                trust_remote_code=source.trust_remote_code)


@functools.cache
def local_copy(source: str) -> str:
    """`source` itself, or for a folder in a bucket, a local copy of its files (made once per process)."""
    if not (source and storage.is_remote(source)):
        return source
    return storage.download(source, tempfile.mkdtemp(prefix="flaxtrain-model-"))


def load_config(source, **overrides):
    """The model config (`source`: a settings.ModelSource) from --config_name, else --model_name_or_path, else a
    default one of --model_type."""
    if source.config_name or source.name_or_path:
        flag = "--config_name" if source.config_name else "--model_name_or_path"
        path = source.config_name or source.name_or_path
        with _named_on_error(flag, path, "config"):
            return AutoConfig.from_pretrained(local_copy(path), **_hub_kwargs(source), **overrides)
    if not source.model_type:
        raise ValueError("Give --model_name_or_path, --config_name or --model_type to say which model to train.")
    return AutoConfig.for_model(source.model_type, **overrides)


def load_generation_settings(source) -> dict:
    """--model_name_or_path's generation_config.json as a dict (its stop tokens, sampling defaults), {} without one."""
    if not source.name_or_path:
        return {}
    try:
        settings = GenerationConfig.from_pretrained(local_copy(source.name_or_path), cache_dir=source.cache_dir,
                                                    revision=source.revision, token=source.token)
    except OSError:  # (no such file in the model: most base models and every config made from scratch)
        return {}
    return settings.to_diff_dict()


def load_tokenizer(source):
    path = source.tokenizer_name or source.name_or_path
    if not path:
        raise ValueError("Give --tokenizer_name (or --model_name_or_path): this script does not train a tokenizer. "
                         "The README shows how to train one on your corpus first.")
    with _named_on_error("--tokenizer_name" if source.tokenizer_name else "--model_name_or_path", path, "tokenizer"):
        return AutoTokenizer.from_pretrained(local_copy(path), use_fast=source.use_fast_tokenizer,
                                             **_hub_kwargs(source))


@contextlib.contextmanager
def _named_on_error(flag: str, path: str, what: str):
    """A local folder whose files do not parse: an error naming the flag and the file, not a bare JSONDecodeError
    from deep inside transformers (a Hub name keeps transformers' own message, which says what to do)."""
    try:
        yield
    except (ValueError, OSError, TypeError, KeyError) as error:
        if not os.path.isdir(path):
            raise
        detail = " ".join(str(error).split())[:300]
        where = getattr(error, "filename", None) or getattr(getattr(error, "doc", None), "name", None)
        raise ValueError(f"{flag}={path}: cannot read its {what} files ({type(error).__name__}: {detail}"
                         f"{f'; in {where}' if where else ''}).") from error


def load_weights(source, template_params, model_type: str, **rules):
    """Params of --model_name_or_path (`source`: a settings.ModelSource) shaped like `template_params` (see
    hf_io.load_pretrained for `rules`)."""
    from flaxtrain import hf_io

    return hf_io.load_pretrained(local_copy(source.name_or_path), template_params, model_type=model_type,
                                 revision=source.revision, token=source.token, cache_dir=source.cache_dir, **rules)


def fit_vocab(hf_config, tokenizer, from_scratch: bool, multiple: int = 128):
    """Makes room for every token of `tokenizer` in the model of `hf_config`. A model trained from scratch grows its
    vocab_size to the tokenizer's length rounded up to `multiple` (the accelerator's tile), with a warning: the
    original recipes' tokenizers have one token (GPT-2's <|endoftext|>) or a hundred (T5's sentinels) more than
    their configs. A model with pretrained weights cannot grow: an error."""
    import logging

    if len(tokenizer) <= hf_config.vocab_size:
        return
    if not from_scratch:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{hf_config.vocab_size}: use the model's own tokenizer, or a model with a larger vocabulary.")
    size = -(-len(tokenizer) // multiple) * multiple
    logging.getLogger(__name__).warning("The tokenizer has %d tokens, more than the config's vocab_size %d: the new "
                                        "model gets vocab_size %d (a multiple of %d).", len(tokenizer),
                                        hf_config.vocab_size, size, multiple)
    hf_config.vocab_size = size

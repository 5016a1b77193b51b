"""Configs and tokenizers through the ordinary transformers paths (Hub names or local folders), and model folders
in a bucket (gs://...), which are copied to a local folder first."""

import functools
import tempfile

import jax.numpy as jnp
from transformers import AutoConfig, AutoTokenizer

from flaxtrain import storage

DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _hub_kwargs(model_args):
    return dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                trust_remote_code=model_args.trust_remote_code)


@functools.cache
def local_copy(source: str) -> str:
    """`source` itself, or for a folder in a bucket, a local copy of its files (made once per process)."""
    if not (source and storage.is_remote(source)):
        return source
    return storage.download(source, tempfile.mkdtemp(prefix="flaxtrain-model-"))


def load_config(model_args, **overrides):
    """The model config from --config_name, else --model_name_or_path, else a default one of --model_type."""
    source = model_args.config_name or model_args.model_name_or_path
    if source:
        return AutoConfig.from_pretrained(local_copy(source), **_hub_kwargs(model_args), **overrides)
    if not model_args.model_type:
        raise ValueError("Give --model_name_or_path, --config_name or --model_type to say which model to train.")
    return AutoConfig.for_model(model_args.model_type, **overrides)


def load_tokenizer(model_args):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if not source:
        raise ValueError("Give --tokenizer_name (or --model_name_or_path): this script does not train a tokenizer. "
                         "The README shows how to train one on your corpus first.")
    return AutoTokenizer.from_pretrained(local_copy(source), use_fast=model_args.use_fast_tokenizer,
                                         **_hub_kwargs(model_args))


def load_weights(model_args, template_params, model_type: str, **rules):
    """Params of --model_name_or_path shaped like `template_params` (see hf_io.load_pretrained for `rules`)."""
    from flaxtrain import hf_io

    return hf_io.load_pretrained(local_copy(model_args.model_name_or_path), template_params, model_type=model_type,
                                 revision=model_args.model_revision, token=model_args.token,
                                 cache_dir=model_args.cache_dir, **rules)


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

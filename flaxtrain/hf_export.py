"""Exports params as a Hugging Face checkpoint that transformers loads: config.json, the weights (one
model.safetensors, or shards of at most `max_shard_size` with their index, as transformers splits them), the
tokenizer. The key rules are flaxtrain/hf_io.py's; each leaf is gathered from the devices one at a time, so a model of
several billion parameters is never whole in one host's memory.
"""

import contextlib
import copy
import glob
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import safetensors.numpy
import transformers
from flax import traverse_util

from flaxtrain import storage
from flaxtrain.hf_io import SHARD_FILE, Tensor, gather_arrays, list_tensors
from flaxtrain.models import get_family

_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _size_in_bytes(size: int | str) -> int:
    """max_shard_size in bytes: an int, or a string like "5GB" (10**9 bytes a GB) or "2GiB" (2**30)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in _SIZE_UNITS.items():
        if text.endswith(unit):
            try:
                return int(float(text[:-len(unit)]) * factor)
            except ValueError:
                break
    raise ValueError(f"max_shard_size={size!r}: give a number of bytes or a size like '5GB', '200KB' or '2GiB'")


def _plan_shards(tensors: Sequence[Tensor], max_shard_size: int) -> dict[str, list[Tensor]]:
    """{file name: its tensors}: tensors in order, a new shard when the next would pass `max_shard_size` (a tensor
    larger than that gets a shard of its own). One shard is model.safetensors, several model-0000i-of-0000N."""
    shards, size = [[]], 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards, 1)}


@contextlib.contextmanager
def _written_atomically(path: str) -> Iterator[str]:
    """A temporary name next to `path` to write to, renamed to `path` at the end: a killed save never leaves a
    truncated file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_weights(output_dir: str, keep: Iterable[str]) -> None:
    """Removes the weight files of an earlier export that this one did not write (model.safetensors after a sharded
    export, shards and index of another count), so that a loader never sees a mix of two exports."""
    keep = set(keep)
    for name in storage.listdir(output_dir):
        if name not in keep and (name in ("model.safetensors", "model.safetensors.index.json")
                                 or SHARD_FILE.fullmatch(name)):
            storage.remove(storage.join(output_dir, name))


def save_pretrained(output_dir: str, params: Mapping, hf_config: Any, tokenizer: Any = None, *,
                    architecture: str, max_shard_size: int | str = 5 * 2**30, save_dtype: Any = None,
                    generation_config: Mapping | None = None) -> None:
    """Write a checkpoint that `transformers.AutoModelFor...from_pretrained(output_dir)` loads: config.json (with
    `architectures=[architecture]`, e.g. model.hf_architecture), the weights, and the tokenizer files.

    params: numpy arrays or jax.Arrays, replicated, sharded over local devices, or split across processes. Every
      process calls this when leaves are split across processes (each is gathered by a collective); only process 0
      writes. Leaves are gathered one at a time, shard by shard: host memory holds about one shard and one leaf.
    max_shard_size: bytes, or a string as transformers takes it ("5GB" = 5 * 10**9 bytes, "5GiB" = 5 * 2**30).
      Weights that fit go to model.safetensors; more are split, tensors in order, into model-00001-of-0000N.safetensors
      ... (a tensor larger than the limit alone in its shard) listed in model.safetensors.index.json.
    save_dtype: dtype of the floating-point weights written, e.g. "bfloat16" (default float32); config.json says it,
      so transformers loads the model in it.
    generation_config: settings for generation_config.json (e.g. a chat model's eos_token_id list, so that
      transformers' generate and pipeline stop at the end of its turn).
    Every file is written under a temporary name and renamed, so a killed save never leaves a truncated one; the
    weight files of an earlier export that this one does not replace are removed once the new ones are in place.
    A bucket URL as output_dir: the files are written locally, then uploaded.
    """
    if storage.is_remote(output_dir):
        with tempfile.TemporaryDirectory(prefix="flaxtrain-export-") as local:
            save_pretrained(local, params, hf_config, tokenizer, architecture=architecture,
                            max_shard_size=max_shard_size, save_dtype=save_dtype, generation_config=generation_config)
            if jax.process_index() == 0:
                storage.put(local, output_dir)
                _remove_stale_weights(output_dir, keep=os.listdir(local))
        return
    rules = get_family(hf_config.model_type).hf
    dtype = np.dtype(save_dtype or "float32")
    flat = traverse_util.flatten_dict(params)
    tensors = list_tensors(flat, scanned=rules.scanned, untransposed=rules.untransposed, renamed=rules.renamed,
                       dtype=dtype)
    shards = _plan_shards(tensors, _size_in_bytes(max_shard_size))
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(output_dir, exist_ok=True)
        config = copy.deepcopy(hf_config)
        config.architectures = [architecture]
        config.dtype = dtype.name  # what we write; transformers loads in the config's dtype by default
        config.save_pretrained(output_dir)
        if generation_config:
            transformers.GenerationConfig(**generation_config).save_pretrained(output_dir)
        for stale in glob.glob(os.path.join(output_dir, ".model*.tmp")):  # left by a killed save
            os.remove(stale)

    arrays = gather_arrays(flat, [t for shard in shards.values() for t in shard])
    for name, shard in shards.items():
        state = dict(itertools.islice(arrays, len(shard)))  # every process gathers: it may be a collective
        if writer:
            with _written_atomically(os.path.join(output_dir, name)) as tmp:
                safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"})
        del state  # before the next shard is gathered, not after
    if not writer:
        return
    written = list(shards)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.key: name for name, shard in shards.items() for t in shard}}
        storage.write_text(os.path.join(output_dir, "model.safetensors.index.json"),
                           json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append("model.safetensors.index.json")
    _remove_stale_weights(output_dir, keep=written)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)

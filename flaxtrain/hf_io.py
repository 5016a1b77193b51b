"""Hugging Face checkpoints: our Flax params <-> transformers PyTorch state dicts, generic over model families.

A params path maps to a checkpoint key by these rules (the model code names its modules after the PyTorch ones):
- path components join with "."; leaf `kernel` -> `weight`, transposed (flax Dense is [in, out], torch Linear
  [out, in]); `embedding` and `scale` -> `weight`; any other leaf (`bias`) keeps its name;
- params under a scanned module path (e.g. `bert.encoder.layer`) carry a leading layer axis and become one key per
  layer: `bert.encoder.layer.{i}.attention.self.query.weight`.
A family module adds HF_SCANNED (its scanned paths), HF_TIED (keys that copy other weights, never saved) and
HF_BASE_PREFIX (model_type -> body prefix), and where it needs them HF_UNTRANSPOSED (regexes of checkpoint keys whose
`kernel` is stored [in, out] as flax has it, e.g. GPT-2's Conv1D), HF_IGNORED (regexes of buffers that old
checkpoints carry and the model does not use) and HF_RENAMED ({params path prefix: checkpoint key prefix} for params
that sit elsewhere in the checkpoint, e.g. T5's shared position bias, kept outside the scanned blocks but saved in
block 0) and HF_ZEROS (regexes of buffers that some checkpoints lack and that load as zeros then, as transformers
initialises them, e.g. BART's final_logits_bias in a checkpoint of the bare BartModel).
"""

import copy
import glob
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors checkpoints load)
import numpy as np
import safetensors.numpy
from flax import traverse_util

from flaxtrain import storage
from flaxtrain.models import get_family

logger = logging.getLogger(__name__)

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
# Keys transformers itself ignores: the position_ids buffer older checkpoints saved.
_IGNORED = (r"(^|\.)position_ids$",)
# TF-era spellings that old checkpoints still use (transformers renames them on load too).
_OLD_NAMES = ((r"\.gamma$", ".weight"), (r"\.beta$", ".bias"))
_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def _hf_keys(path: tuple[str, ...], num_layers: int, scanned: Sequence[str],
             renamed: Mapping[str, str] | None = None) -> tuple[list[str], bool]:
    """Checkpoint key(s) of one params leaf, and whether the leaf is stacked over layers."""
    key = ".".join((*path[:-1], _LEAF_TO_HF.get(path[-1], path[-1])))
    for ours, theirs in (renamed or {}).items():
        if key.startswith(ours + "."):
            return [theirs + key[len(ours):]], False
    for prefix in scanned:
        if m := re.match(rf"^((?:.*\.)?{re.escape(prefix)})\.(.+)$", key):
            return [f"{m[1]}.{i}.{m[2]}" for i in range(num_layers)], True
    return [key], False


def _leading(array) -> int:
    """Size of the leading axis (the layer count of a stacked leaf); works for ShapeDtypeStructs too."""
    return array.shape[0] if len(array.shape) else 0


def _listing(keys: Sequence[str], limit: int = 20) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _transposed(path: tuple[str, ...], key: str, untransposed: Sequence[str]) -> bool:
    """Whether the checkpoint holds this leaf transposed: Dense kernels, except those matching `untransposed`."""
    return path[-1] == "kernel" and not _matches(key, untransposed)


def params_to_state_dict(params: Mapping, *, scanned: Sequence[str] = (), untransposed: Sequence[str] = (),
                         renamed: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Params tree -> {PyTorch key: array in PyTorch layout}. Stacked leaves under `scanned` paths are split per layer;
    kernels whose key matches an `untransposed` regex are written as they are.
    Params must be fully addressable (replicated or on one host): gather them first when sharded across hosts."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(jax.device_get(value))
        keys, stacked = _hf_keys(path, _leading(value), scanned, renamed)
        for key, array in zip(keys, value if stacked else [value]):
            if _transposed(path, key, untransposed):
                if array.ndim != 2:
                    raise ValueError(f"{'/'.join(path)}: no checkpoint layout rule for a {array.ndim}-D kernel")
                array = array.T
            state[key] = np.ascontiguousarray(array)
    return state


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], template: Mapping, *, scanned: Sequence[str] = (),
                         tied: Mapping[str, str] | None = None, fresh: Sequence[str] = (), drop: Sequence[str] = (),
                         base_model_prefix: str | None = None, untransposed: Sequence[str] = (),
                         renamed: Mapping[str, str] | None = None, zeros: Sequence[str] = ()) -> dict:
    """PyTorch state dict -> params tree shaped and typed like `template` (init'd or `jax.eval_shape`d params).

    fresh: regexes over checkpoint keys of template params that may be absent from the checkpoint; those keep the
      template's values (so the template must hold real arrays for them), e.g. a new classifier head.
    drop: regexes over checkpoint keys that may be left unused, e.g. an MLM head when loading a classifier.
    tied: {key: source} checkpoint keys that are copies of another weight; checked equal to the source and dropped,
      unless the template has a param of that key (a model configured with untied weights), which the source
      fills when the checkpoint was saved tied.
    untransposed: regexes over checkpoint keys of kernels stored [in, out], as flax has them.
    zeros: regexes over checkpoint keys that load as zeros when absent (works with eval_shape'd templates).
    base_model_prefix: prepended to every checkpoint key when that makes more keys fit the template (a checkpoint
      of the bare body, as transformers' AutoModel saves it).
    Anything else missing or unexpected, and any shape mismatch, raises ValueError naming the keys.
    Returns a nested dict of numpy arrays (put them on devices with the sharding you want).
    """
    state = {}
    for key, value in state_dict.items():
        if not _matches(key, _IGNORED):
            for old, new in _OLD_NAMES:
                key = re.sub(old, new, key)
            state[key] = value
    flat = traverse_util.flatten_dict(template)
    wanted = {k for path, leaf in flat.items() for k in _hf_keys(path, _leading(leaf), scanned, renamed)[0]}
    if base_model_prefix:  # a checkpoint of the bare body (transformers' AutoModel) lacks the prefix
        prefixed = {f"{base_model_prefix}.{k}": v for k, v in state.items()}
        if len(wanted & prefixed.keys()) > len(wanted & state.keys()):
            state = prefixed
    for key, source in (tied or {}).items():
        if key in state and key not in wanted:
            value = state.pop(key)
            if source not in state:  # some checkpoints keep only the copy
                state[source] = value
            elif not np.array_equal(np.asarray(value), np.asarray(state[source])):
                raise ValueError(f"checkpoint key {key} differs from {source}; this model ties them (untied "
                                 "checkpoints are not supported)")
        elif key in wanted and key not in state and source in state:
            # A checkpoint saved tied for a model configured untied: transformers 5 ties T5 v1.1's and mT5's lm_head
            # even so (its T5 configs force tie_word_embeddings), and saves no copy.
            logger.warning("%s is not in the checkpoint: copied from %s (saved tied)", key, source)
            state[key] = state[source]

    params, used, missing, fresh_keys, mismatched = {}, set(), [], [], []
    for path, leaf in flat.items():
        keys, stacked = _hf_keys(path, _leading(leaf), scanned, renamed)
        absent = [k for k in keys if k not in state]
        if absent:
            if len(absent) == len(keys) and all(_matches(k, zeros) for k in keys):
                params[path] = np.zeros(leaf.shape, leaf.dtype)
                fresh_keys += keys
            elif len(absent) == len(keys) and all(_matches(k, fresh) for k in keys):
                if isinstance(leaf, jax.ShapeDtypeStruct):
                    raise ValueError(f"{keys[0]} is allowed fresh but the template has no values for it: "
                                     "pass init'd params, not eval_shape'd ones")
                params[path] = np.asarray(leaf)
                fresh_keys += keys
            else:
                missing += absent
            continue
        expected = leaf.shape[1:] if stacked else leaf.shape
        transposed = _transposed(path, keys[0], untransposed)
        if transposed:
            expected = expected[::-1]
        arrays = []
        for key in keys:
            used.add(key)
            array = np.asarray(state[key])
            if array.shape != expected:
                mismatched.append(f"{key}: expected {tuple(expected)}, found {tuple(array.shape)}")
                continue
            arrays.append(array.T if transposed else array)
        if len(arrays) == len(keys):
            params[path] = (np.stack(arrays) if stacked else arrays[0]).astype(leaf.dtype)

    unused = [k for k in state if k not in used]
    unexpected = sorted(k for k in unused if not _matches(k, drop))
    errors = [f"{len(missing)} missing key(s): {_listing(sorted(missing))}"] if missing else []
    errors += [f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}"] if unexpected else []
    errors += [f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}"] if mismatched else []
    if errors:
        raise ValueError("checkpoint does not fit the model: " + "; ".join(errors))
    if fresh_keys:
        logger.warning("not in the checkpoint, newly initialised: %s", _listing(fresh_keys))
    if unused:
        logger.info("in the checkpoint, not used by the model: %s", _listing(sorted(unused)))
    return traverse_util.unflatten_dict(params)


def _read_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return safetensors.numpy.load_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch pickle and torch is not installed: install torch (CPU is enough) "
                          "or use a checkpoint with model.safetensors") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    # numpy has no bfloat16 view of a torch tensor; we load into float32 params anyway.
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _download(name: str, revision: str | None, **hub) -> str:
    """Local snapshot of a Hub repo's weights: safetensors when the repo has them, else the PyTorch pickle."""
    from huggingface_hub import snapshot_download

    for patterns in (["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
                     ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]):
        local = snapshot_download(name, revision=revision, allow_patterns=patterns, **hub)
        if any(os.path.exists(os.path.join(local, f)) for f in patterns[:2]):
            return local
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their sharded forms) in {name}")


def load_state_dict(model_name_or_path: str, revision: str | None = None, **hub) -> dict[str, np.ndarray]:
    """{key: array} of a checkpoint: a file, a local directory, or a Hub repo name (downloaded; `hub` may give
    token and cache_dir). A directory is read from model.safetensors, a sharded model.safetensors.index.json, or
    pytorch_model.bin(.index.json), in that order."""
    if os.path.exists(model_name_or_path):
        path = model_name_or_path
    else:
        path = _download(model_name_or_path, revision, **{k: v for k, v in hub.items() if v is not None})
    if os.path.isdir(path):
        found = [f for f in _CHECKPOINT_FILES if os.path.exists(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"no {', '.join(_CHECKPOINT_FILES)} in {path}")
        path = os.path.join(path, found[0])
    if not path.endswith(".index.json"):
        return _read_file(path)
    with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(_read_file(os.path.join(os.path.dirname(path), shard)))
    return state


def load_pretrained(model_name_or_path: str, template_params: Mapping, *, model_type: str,
                    fresh: Sequence[str] = (), drop: Sequence[str] = (), revision: str | None = None,
                    **hub) -> dict:
    """Params for a model of `model_type` from a local or Hub checkpoint; see `state_dict_to_params` for fresh/drop.

    E.g. a GLUE classifier from an MLM checkpoint:
      load_pretrained(path, init_params(model, rng), model_type="roberta",
                      fresh=bert.HF_CLASSIFIER_HEAD, drop=bert.HF_PRETRAINING_HEADS)
    """
    family = get_family(model_type)
    return state_dict_to_params(
        load_state_dict(model_name_or_path, revision, **hub), template_params, scanned=family.HF_SCANNED,
        tied=family.HF_TIED, fresh=fresh, drop=(*drop, *getattr(family, "HF_IGNORED", ())),
        base_model_prefix=family.HF_BASE_PREFIX.get(model_type),
        untransposed=getattr(family, "HF_UNTRANSPOSED", ()), renamed=getattr(family, "HF_RENAMED", None),
        zeros=getattr(family, "HF_ZEROS", ()))


def save_pretrained(output_dir: str, params: Mapping, hf_config: Any, tokenizer: Any = None, *,
                    architecture: str) -> None:
    """Write a checkpoint that `transformers.AutoModelFor...from_pretrained(output_dir)` loads: config.json (with
    `architectures=[architecture]`, e.g. model.hf_architecture), model.safetensors, and the tokenizer files.
    Call on one process only. model.safetensors is written to a temporary file and renamed, so a killed save
    never leaves a truncated one. A bucket URL as output_dir: the files are written locally, then uploaded."""
    if storage.is_remote(output_dir):
        with tempfile.TemporaryDirectory(prefix="flaxtrain-export-") as local:
            save_pretrained(local, params, hf_config, tokenizer, architecture=architecture)
            storage.put(local, output_dir)
        return
    family = get_family(hf_config.model_type)
    os.makedirs(output_dir, exist_ok=True)
    config = copy.deepcopy(hf_config)
    config.architectures = [architecture]
    config.dtype = "float32"  # what we write; transformers loads in the config's dtype by default
    config.save_pretrained(output_dir)
    state = params_to_state_dict(params, scanned=family.HF_SCANNED,
                                 untransposed=getattr(family, "HF_UNTRANSPOSED", ()),
                                 renamed=getattr(family, "HF_RENAMED", None))
    for stale in glob.glob(os.path.join(output_dir, ".model.safetensors.*.tmp")):  # left by a killed save
        os.remove(stale)
    tmp = os.path.join(output_dir, f".model.safetensors.{os.getpid()}.tmp")
    try:
        safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(output_dir, "model.safetensors"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)

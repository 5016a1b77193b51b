"""Hugging Face checkpoints: our Flax params <-> transformers PyTorch state dicts, generic over model families.

A params path maps to a checkpoint key by these rules (the model code names its modules after the PyTorch ones):
- path components join with "."; leaf `kernel` -> `weight`, transposed (flax Dense is [in, out], torch Linear
  [out, in]); `embedding` and `scale` -> `weight`; any other leaf (`bias`) keeps its name;
- params under a scanned module path (e.g. `bert.encoder.layer`) carry a leading layer axis and become one key per
  layer: `bert.encoder.layer.{i}.attention.self.query.weight`.
Each family's exceptions are the `hf` field of its record (`flaxtrain.models.family.HfRules`, e.g.
`bert.FAMILY.hf`), found by model_type: `scanned` (its scanned paths), `tied` (keys that copy other weights, never
saved), `base_prefix` (model_type -> body prefix), and where the family needs them `untransposed` (regexes of
checkpoint keys whose `kernel` is stored [in, out] as flax has it, e.g. GPT-2's Conv1D), `ignored` (regexes of buffers
that old checkpoints carry and the model does not use), `renamed` ({params path prefix: checkpoint key prefix} for
params that sit elsewhere in the checkpoint, e.g. T5's shared position bias, kept outside the scanned blocks but saved
in block 0) and `zeros` (regexes of buffers that some checkpoints lack and that load as zeros then, as transformers
initialises them, e.g. BART's final_logits_bias in a checkpoint of the bare BartModel). `pretraining_heads` and
`classifier_head` are what a classifier passes as `drop=` and `fresh=` to load_pretrained.

Models of several billion parameters never sit whole in one host's memory: loading reads a safetensors checkpoint
tensor by tensor and builds one params leaf at a time (a `place` function can put each on devices as it is done);
exporting (flaxtrain/hf_export.py, with these rules) gathers one leaf at a time and writes shards of at most
`max_shard_size`, as transformers splits them.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors checkpoints load)
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util
from jax.experimental import multihost_utils

from flaxtrain import flax_msgpack
from flaxtrain.models import get_family
from flaxtrain.models.family import LEAF_TO_HF

logger = logging.getLogger(__name__)

# Keys transformers itself ignores: the position_ids buffer older checkpoints saved.
_IGNORED = (r"(^|\.)position_ids$",)
# TF-era spellings that old checkpoints still use (transformers renames them on load too).
_OLD_NAMES = ((r"\.gamma$", ".weight"), (r"\.beta$", ".bias"))
# In the order they are looked for (see _by_preference); the original Flax scripts' msgpack last
# (flaxtrain/flax_msgpack.py).
_CHECKPOINT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json", flax_msgpack.WEIGHTS, flax_msgpack.INDEX)
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# max_shard_size units as transformers reads them: KB/MB/GB/TB in powers of 10 (huggingface_hub's parse_size_to_int,
# which its save_pretrained uses), KiB/MiB/GiB in powers of 2 (its convert_file_size_to_int).

Place = Callable[[tuple[str, ...], np.ndarray], Any]


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, key) for p in patterns)


def _hf_keys(path: tuple[str, ...], num_layers: int, scanned: Sequence[str],
             renamed: Mapping[str, str] | None = None) -> tuple[list[str], bool]:
    """Checkpoint key(s) of one params leaf, and whether the leaf is stacked over layers."""
    key = ".".join((*path[:-1], LEAF_TO_HF.get(path[-1], path[-1])))
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


# ---------------------------------------------------------------------------------------------------------------------
# Params -> checkpoint tensors


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor of a params tree: which leaf (and layer of a stacked leaf) it is, and how it is written."""
    key: str
    path: tuple[str, ...]
    layer: int | None
    transposed: bool
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def list_tensors(flat: Mapping[tuple[str, ...], Any], *, scanned: Sequence[str], untransposed: Sequence[str],
                 renamed: Mapping[str, str] | None, dtype: np.dtype | None = None) -> list[Tensor]:
    """The checkpoint tensors of flattened params, from the leaves' shapes alone, leaf by leaf (in sorted path order,
    the same on every process, since gathering a leaf split across processes is a collective). Floating-point
    leaves are written in `dtype` (default: their own)."""
    tensors = []
    for path in sorted(flat):
        leaf = flat[path]
        keys, stacked = _hf_keys(path, _leading(leaf), scanned, renamed)
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        out = dtype if dtype is not None and jax.dtypes.issubdtype(leaf.dtype, np.floating) else np.dtype(leaf.dtype)
        for layer, key in enumerate(keys):
            transposed = _transposed(path, key, untransposed)
            if transposed and len(shape) != 2:
                raise ValueError(f"{'/'.join(path)}: no checkpoint layout rule for a {len(shape)}-D kernel")
            tensors.append(Tensor(key, path, layer if stacked else None, transposed,
                                  shape[::-1] if transposed else shape, out))
    return tensors


def _gather(leaf) -> np.ndarray:
    """A params leaf whole, as numpy on this host. A collective (every process calls it) for a leaf split across
    processes."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def gather_arrays(flat: Mapping[tuple[str, ...], Any], tensors: Sequence[Tensor]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array in PyTorch layout and the tensor's dtype) for each of `tensors`, gathering each leaf once and
    keeping only the leaf in hand."""
    path = leaf = None
    for tensor in tensors:
        if tensor.path != path:
            leaf = None  # let the previous leaf go before the next one arrives
            path, leaf = tensor.path, _gather(flat[tensor.path])
        array = leaf if tensor.layer is None else leaf[tensor.layer]
        # A copy, not a view: a view would keep the whole gathered leaf alive for as long as the shard is.
        yield tensor.key, np.array(array.T if tensor.transposed else array, dtype=tensor.dtype, order="C")


def params_to_state_dict(params: Mapping, *, scanned: Sequence[str] = (), untransposed: Sequence[str] = (),
                         renamed: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Params tree -> {PyTorch key: array in PyTorch layout}, all of it in host memory (for small models and tests;
    save_pretrained writes large ones shard by shard). Stacked leaves under `scanned` paths are split per layer;
    kernels whose key matches an `untransposed` regex are written as they are. Leaves split across processes are
    gathered: then every process must call it."""
    flat = traverse_util.flatten_dict(params)
    return dict(gather_arrays(flat, list_tensors(flat, scanned=scanned, untransposed=untransposed, renamed=renamed)))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint tensors -> params


def state_dict_to_params(state_dict: Mapping[str, Any], template: Mapping, *, scanned: Sequence[str] = (),
                         tied: Mapping[str, str] | None = None, fresh: Sequence[str] = (), drop: Sequence[str] = (),
                         base_model_prefix: str | None = None, untransposed: Sequence[str] = (),
                         renamed: Mapping[str, str] | None = None, zeros: Sequence[str] = (),
                         place: Place | None = None, init: Callable[[], Mapping] | None = None) -> dict:
    """PyTorch state dict -> params tree shaped and typed like `template` (init'd, `jax.eval_shape`d or sharded
    params).

    state_dict: {key: array}, or {key: anything with a `shape` that np.asarray reads}, as load_pretrained passes
      tensors still on disk. Keys and shapes are all checked first; then each leaf is built in turn (transposed,
      stacked over layers, cast to the template's dtype), reading only its own tensors.
    fresh: regexes over checkpoint keys of template params that may be absent from the checkpoint; those keep the
      template's values (a jax.Array stays as it is, on its devices), e.g. a new classifier head; or, where the
      template is eval_shape'd, take them from `init()`: initialised params, made only if some leaf is fresh (so a
      checkpoint that has every weight spares the model's initialisation).
    drop: regexes over checkpoint keys that may be left unused, e.g. an MLM head when loading a classifier.
    tied: {key: source} checkpoint keys that are copies of another weight; checked equal to the source and dropped,
      unless the template has a param of that key (a model configured with untied weights), which the source
      fills when the checkpoint was saved tied.
    untransposed: regexes over checkpoint keys of kernels stored [in, out], as flax has them.
    zeros: regexes over checkpoint keys that load as zeros when absent (works with eval_shape'd templates).
    base_model_prefix: prepended to every checkpoint key when that makes more keys fit the template (a checkpoint
      of the bare body, as transformers' AutoModel saves it).
    place: called as place(path, array) with each leaf built (numpy, the template leaf's shape and dtype); what it
      returns goes into the tree, e.g. the array put on devices with a NamedSharding, so that host memory holds one
      leaf at a time.
    Anything else missing or unexpected, and any shape mismatch, raises ValueError naming the keys.
    Returns a nested dict of numpy arrays, or of what `place` returns.
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

    # First every key and shape, so that a checkpoint that does not fit fails before any leaf is read or placed.
    loaded, zeroed, used, missing, fresh_keys, mismatched = {}, set(), set(), [], [], []
    for path, leaf in flat.items():
        keys, stacked = _hf_keys(path, _leading(leaf), scanned, renamed)
        absent = [k for k in keys if k not in state]
        if absent:
            if len(absent) == len(keys) and all(_matches(k, zeros) for k in keys):
                zeroed.add(path)
                fresh_keys += keys
            elif len(absent) == len(keys) and all(_matches(k, fresh) for k in keys):
                if isinstance(leaf, jax.ShapeDtypeStruct) and init is None:
                    raise ValueError(f"{keys[0]} is allowed fresh but the template has no values for it: "
                                     "pass init'd params, not eval_shape'd ones, or `init`")
                fresh_keys += keys
            else:
                missing += absent
            continue
        expected = leaf.shape[1:] if stacked else leaf.shape
        transposed = _transposed(path, keys[0], untransposed)
        if transposed:
            expected = expected[::-1]
        for key in keys:
            used.add(key)
            if tuple(np.shape(state[key])) != tuple(expected):
                mismatched.append(f"{key}: expected {tuple(expected)}, found {tuple(np.shape(state[key]))}")
        loaded[path] = [state[k] for k in keys], stacked, transposed

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

    if init is not None and any(isinstance(flat[path], jax.ShapeDtypeStruct) for path in flat
                                if path not in loaded and path not in zeroed):
        flat = {**flat, **{path: leaf for path, leaf in traverse_util.flatten_dict(init()).items()
                           if path not in loaded and path not in zeroed}}
    params = {}
    for path, leaf in flat.items():
        if path in loaded:
            array = _build_leaf(leaf, *loaded[path])
        elif path in zeroed:
            array = np.zeros(leaf.shape, leaf.dtype)
        elif isinstance(leaf, jax.Array):  # fresh, and already where the caller wants it: never pulled to the host
            params[path] = leaf
            continue
        else:  # fresh
            array = np.asarray(leaf)
        params[path] = array if place is None else place(path, array)
    return traverse_util.unflatten_dict(params)


def _build_leaf(leaf, tensors: Sequence[Any], stacked: bool, transposed: bool) -> np.ndarray:
    """One params leaf, shaped and typed like the template's `leaf`, from its checkpoint tensor (one per layer when
    stacked): each tensor is read, transposed and cast straight into the leaf, so host memory holds the leaf and one
    tensor."""
    array = np.empty(leaf.shape, leaf.dtype)
    for layer, tensor in enumerate(tensors):
        tensor = np.asarray(tensor)
        target = array[layer] if stacked else array
        target[...] = tensor.T if transposed else tensor
    return array


@dataclasses.dataclass(frozen=True)
class _StoredTensor:
    """A tensor of a safetensors file, read from disk only when np.asarray asks for it."""
    file: str
    key: str
    shape: tuple[int, ...]

    def __array__(self, dtype=None, copy=None):
        with safetensors.safe_open(self.file, framework="numpy") as f:
            array = f.get_tensor(self.key)
        return array if dtype is None else array.astype(dtype)


def _read_file(path: str) -> dict[str, Any]:
    """{key: tensor} of one checkpoint file: a safetensors file's tensors stay on disk (only its header is read), a
    PyTorch pickle is read whole."""
    if path.endswith(".safetensors"):
        with safetensors.safe_open(path, framework="numpy") as f:
            return {k: _StoredTensor(path, k, tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch pickle and torch is not installed: install torch (CPU is enough) "
                          f"or use a checkpoint with model.safetensors or {flax_msgpack.WEIGHTS}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    # numpy has no bfloat16 view of a torch tensor; we load into float32 params anyway.
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _by_preference(formats: Sequence) -> list:
    """`formats` (safetensors, PyTorch pickle, msgpack: files or download patterns) in the order to try them: the
    pickle after the msgpack when torch is not installed (as on a TPU VM), since only torch reads it."""
    if importlib.util.find_spec("torch") is not None:
        return list(formats)
    return sorted(formats, key=lambda f: "pytorch_model" in str(f))


def _download(name: str, revision: str | None, **hub) -> str:
    """Local snapshot of a Hub repo's weights: safetensors when the repo has them, else the PyTorch pickle, else the
    original Flax scripts' msgpack."""
    from huggingface_hub import snapshot_download

    for patterns in _by_preference((
            ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
            ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"],
            # config.json too: the original's Flax models computed some tables that the weights lack.
            [flax_msgpack.WEIGHTS, flax_msgpack.INDEX, "flax_model-*-of-*.msgpack", "config.json"])):
        local = snapshot_download(name, revision=revision, allow_patterns=patterns, **hub)
        if any(os.path.exists(os.path.join(local, f)) for f in patterns[:2]):
            return local
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or {flax_msgpack.WEIGHTS} (or their sharded "
                            f"forms) in {name}")


def _checkpoint(model_name_or_path: str, revision: str | None = None, **hub) -> dict[str, Any]:
    """{key: tensor} of a checkpoint (see load_state_dict), safetensors tensors still on disk."""
    if os.path.exists(model_name_or_path):
        path = model_name_or_path
    else:
        path = _download(model_name_or_path, revision, **{k: v for k, v in hub.items() if v is not None})
    if os.path.isdir(path):
        found = [f for f in _by_preference(_CHECKPOINT_FILES) if os.path.exists(os.path.join(path, f))]
        if not found:
            raise FileNotFoundError(f"no {', '.join(_CHECKPOINT_FILES)} in {path}")
        path = os.path.join(path, found[0])
    if path.endswith((".msgpack", flax_msgpack.INDEX)):  # read whole, converted to PyTorch keys and layouts
        return flax_msgpack.read(path)
    if not path.endswith(".index.json"):
        return _read_file(path)
    with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(_read_file(os.path.join(os.path.dirname(path), shard)))
    return state


def load_state_dict(model_name_or_path: str, revision: str | None = None, **hub) -> dict[str, np.ndarray]:
    """{key: array} of a checkpoint: a file, a local directory, or a Hub repo name (downloaded; `hub` may give
    token and cache_dir). A directory is read from model.safetensors, a sharded model.safetensors.index.json,
    pytorch_model.bin(.index.json) or the original Flax scripts' flax_model.msgpack(.index.json), in that order.
    Reads every tensor into memory: load_pretrained does not."""
    return {k: np.asarray(v) for k, v in _checkpoint(model_name_or_path, revision, **hub).items()}


def load_pretrained(model_name_or_path: str, template_params: Mapping, *, model_type: str,
                    fresh: Sequence[str] = (), drop: Sequence[str] = (), revision: str | None = None,
                    place: Place | None = None, init: Callable[[], Mapping] | None = None, **hub) -> dict:
    """Params for a model of `model_type` from a local or Hub checkpoint; see `state_dict_to_params` for fresh/drop.

    A safetensors checkpoint (model.safetensors, or the shards of model.safetensors.index.json) is read tensor by
    tensor as each leaf is built; `place(path, array)`, when given, takes each finished leaf (e.g. onto devices with
    a NamedSharding) and what it returns goes into the tree, so that host memory holds one leaf at a time. The
    template may be eval_shape'd or sharded. E.g. a GLUE classifier from an MLM checkpoint:
      rules = bert.FAMILY.hf
      load_pretrained(path, init_params(model, rng), model_type="roberta",
                      fresh=rules.classifier_head, drop=rules.pretraining_heads)
    """
    rules = get_family(model_type).hf
    state = _checkpoint(model_name_or_path, revision, **hub)
    if isinstance(state, flax_msgpack.StateDict):  # weights the original Flax heads lacked are initialised anew
        fresh = (*fresh, *flax_msgpack.ABSENT.get(model_type, ()))
    return state_dict_to_params(
        state, template_params, scanned=rules.scanned, tied=rules.tied, fresh=fresh, drop=(*drop, *rules.ignored),
        base_model_prefix=rules.base_prefix.get(model_type), untransposed=rules.untransposed, renamed=rules.renamed,
        zeros=rules.zeros, place=place, init=init)

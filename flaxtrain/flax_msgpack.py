"""Checkpoints of the original Hugging Face Flax models: flax_model.msgpack, or its shards
flax_model-0000k-of-0000N.msgpack listed in flax_model.msgpack.index.json, as the original scripts (and the Flax/JAX
community week's Hub repos) saved them.

A msgpack file holds the original model's params tree. It becomes a PyTorch state dict by the rules transformers
(up to 4.57) used to load Flax weights into PyTorch models, after which `hf_io` loads it like any PyTorch checkpoint
(the family's HfRules, the base-model prefix of a checkpoint of the bare body, tied weights):
- path components join with "." (the original named its modules as PyTorch does: `layer/0/...`, T5's gated
  `wi_0`/`wi_1`, which keep their names); `kernel` -> `weight`, transposed ([in, out] -> [out, in]; a 4-D conv
  kernel [H, W, in, out] -> [out, in, H, W]); `scale` and `embedding` -> `weight`; other leaves keep their names;
- a shard's keys are already flat, "/"-joined paths; the shards are those the index's weight_map names;
- float16/bfloat16 arrays stay as they are (hf_io casts each into the float32 params);
- tables that transformers' PyTorch models hold as weights (so our families load them) but the original's Flax models
  computed instead (Pegasus's and RoFormer's sinusoidal positions) are absent: they are made from config.json next to
  the checkpoint, as transformers initialised them when it loaded Flax weights into PyTorch;
- weights that PyTorch's (and our) heads have but the original's did not (BigBird's pooler in its masked-LM head)
  are absent too: transformers initialised them anew, and so does hf_io (ABSENT, passed as `fresh`).
"""

import json
import os

import numpy as np
from flax import serialization, traverse_util

from flaxtrain.models import marian, roformer
from flaxtrain.models.family import LEAF_TO_HF

WEIGHTS = "flax_model.msgpack"
INDEX = "flax_model.msgpack.index.json"


def _pegasus_positions(config: dict) -> dict[str, np.ndarray]:
    table = marian.sinusoidal_table(config["max_position_embeddings"], config["d_model"])
    return {"model.encoder.embed_positions.weight": table, "model.decoder.embed_positions.weight": table}


def _roformer_positions(config: dict) -> dict[str, np.ndarray]:
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return {"roformer.encoder.embed_positions.weight":
            roformer.sinusoidal_table(config["max_position_embeddings"], head_dim)}


# model_type -> the tables (config -> {checkpoint key: array}) that its original Flax model computed, not stored.
COMPUTED = {"pegasus": _pegasus_positions, "roformer": _roformer_positions}
# model_type -> regexes of checkpoint keys that the original's Flax heads lacked: initialised anew.
ABSENT = {"big_bird": (r"^bert\.pooler\.",)}


class StateDict(dict):
    """{PyTorch key: array} converted from a Flax checkpoint (so that hf_io knows to apply ABSENT)."""


def to_state_dict(params: dict) -> dict[str, np.ndarray]:
    """The original's Flax params tree (nested, or flat with "/"-joined keys as in a shard) -> {PyTorch key: array
    in PyTorch layout}."""
    state = {}
    for path, array in traverse_util.flatten_dict(params, sep="/").items():
        *names, leaf = path.split("/")
        array = np.asarray(array)
        if leaf == "kernel":
            if array.ndim not in (2, 4):
                raise ValueError(f"{path}: no PyTorch layout rule for a {array.ndim}-D kernel")
            array = array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)
        state[".".join((*names, LEAF_TO_HF.get(leaf, leaf)))] = array
    return state


def read_file(path: str) -> dict[str, np.ndarray]:
    """{PyTorch key: array} of one msgpack file (a whole checkpoint or one shard), read whole into memory (msgpack
    has no index to read one tensor from, as safetensors has)."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"version https://git-lfs"):
        raise ValueError(f"{path} is a git-lfs pointer, not the weights: the repository was cloned without git-lfs "
                         "(run `git lfs install` and `git lfs pull` in it)")
    try:
        params = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack's own errors, ValueError, TypeError...: all say the same to the user
        raise ValueError(f"{path} is not a readable Flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path} is not a Flax msgpack checkpoint: it holds a {type(params).__name__}, not a "
                         "params tree")
    return StateDict(to_state_dict(params))


def read(path: str) -> dict[str, np.ndarray]:
    """{PyTorch key: array} of a Flax checkpoint: flax_model.msgpack, or flax_model.msgpack.index.json and every shard
    its weight_map names, plus the tables of COMPUTED made from the config.json beside it."""
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = StateDict()
        for shard in shards:
            state.update(read_file(os.path.join(os.path.dirname(path), shard)))
    else:
        state = read_file(path)
    config_file = os.path.join(os.path.dirname(path), "config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            config = json.load(f)
        if config.get("model_type") in COMPUTED:
            body = {key.split(".", 1)[0] for key in state}
            for key, table in COMPUTED[config["model_type"]](config).items():
                prefix, rest = key.split(".", 1)
                # A checkpoint of the bare body (the original's Flax{Pegasus,RoFormer}Model) lacks the prefix.
                state.setdefault(key if prefix in body else rest, table)
    return state

"""Logical axis names on T5's and BART's params (models/partitioning.py), and the shardings parallel.py gives them
on 8 simulated CPU devices."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest
from flax import traverse_util

from flaxtrain.models import bart, t5
from flaxtrain.models.partitioning import BUCKETS, EMBED, HEADS, LAYERS, MLP, NORM, POSITIONS, VOCAB

# Widths divisible by the tensor axis (2) and by 8; layer and position counts that are not, so that "a leaf with a
# dimension divisible by 8" means one that fsdp=8 should split.
T5_TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=12)
MODELS = {
    "t5-v1.0": (t5.FAMILY, t5.T5Config(**T5_TINY, feed_forward_proj="relu", tie_word_embeddings=True)),
    "t5-v1.1": (t5.FAMILY, t5.T5Config(**T5_TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mbart": (bart.FAMILY, bart.BartConfig(vocab_size=96, d_model=32, encoder_layers=3, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=48,
                                    decoder_ffn_dim=64, max_position_embeddings=20, model_type="mbart")),
}
# The logical names of each Dense kernel [in, out], by module name; its bias takes the output's.
KERNELS = {**dict.fromkeys(("q", "k", "v", "q_proj", "k_proj", "v_proj"), (EMBED, HEADS)),
           **dict.fromkeys(("o", "out_proj"), (HEADS, EMBED)),
           **dict.fromkeys(("wi", "wi_0", "wi_1", "fc1"), (EMBED, MLP)),
           **dict.fromkeys(("wo", "fc2"), (MLP, EMBED)),
           "lm_head": (EMBED, VOCAB)}
EMBEDDINGS = {"shared": (VOCAB, EMBED), "embed_positions": (POSITIONS, EMBED),
              "relative_attention_bias": (BUCKETS, HEADS)}


@functools.cache
def boxed(name):
    """{path: LogicallyPartitioned of a ShapeDtypeStruct} of MODELS[name], allocating nothing."""
    family, config = MODELS[name]
    params = jax.eval_shape(functools.partial(family.init_params, family.heads["Seq2SeqLM"](config), unbox=False),
                            jax.random.key(0))
    return traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))


def expected_names(family, path):
    """The logical names of the param at `path`, the scanned layers' leading LAYERS included."""
    module, param = path[-2] if len(path) > 1 else "", path[-1]
    scanned = any(f".{stack}." in f".{'.'.join(path)}." for stack in family.hf.scanned)
    if param == "final_logits_bias":
        names = (None, VOCAB)
    elif param == "scale" or "norm" in module:  # T5's RMS norms, BART's LayerNorms (scale and bias)
        names = (NORM,)
    elif param == "embedding":
        names = EMBEDDINGS[module]
    else:
        names = KERNELS[module] if param == "kernel" else KERNELS[module][-1:]
    return (LAYERS,) * scanned + names


@pytest.mark.parametrize("name", list(MODELS))
def test_every_param_has_one_logical_name_per_dimension(name):
    family, config = MODELS[name]
    leaves = boxed(name)
    unnamed = [path for path, leaf in leaves.items() if not isinstance(leaf, nn.LogicallyPartitioned)]
    assert not unnamed, f"params without logical names: {unnamed}"
    for path, leaf in leaves.items():
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)
        assert leaf.names == expected_names(family, path), path
    assert any(leaf.names[0] == LAYERS for leaf in leaves.values())
    # unbox=True (the default) hands out plain arrays, in the same tree
    plain = jax.eval_shape(functools.partial(family.init_params, family.heads["Seq2SeqLM"](config)),
                           jax.random.key(0))
    assert traverse_util.flatten_dict(plain).keys() == leaves.keys()
    assert not any(isinstance(x, nn.LogicallyPartitioned)
                   for x in jax.tree.leaves(plain, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))


def sharding_specs() -> dict:
    """{model: {"fsdp8" or "fsdp4_tp2": {"a/b/kernel": PartitionSpec as a list}}} with parallel.RULES; run on 8
    devices (the subprocess below)."""
    from flaxtrain import parallel

    meshes = {"fsdp8": parallel.make_mesh(fsdp=8), "fsdp4_tp2": parallel.make_mesh(fsdp=4, tensor_parallel=2)}
    return {name: {mesh_name: {"/".join(path): list(sharding.spec)
                               for path, sharding in parallel.shardings(boxed(name), mesh, parallel.RULES).items()}
                   for mesh_name, mesh in meshes.items()}
            for name in MODELS}


@pytest.fixture(scope="module")
def specs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    code = "import json, tests.test_partitioning_seq2seq as t; print(json.dumps(t.sharding_specs()))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def axes(entry) -> tuple:
    """A PartitionSpec entry (None, an axis, or a list of axes) as a tuple of mesh axes."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp_splits_every_param_it_can(name, specs):
    for path, leaf in boxed(name).items():
        spec = specs[name]["fsdp8"]["/".join(path)]
        split = [axis for entry in spec for axis in axes(entry)]
        if any(size % 8 == 0 for size in leaf.value.shape):
            assert split == ["fsdp"], (path, leaf.value.shape, spec)
        else:
            assert not split, (path, leaf.value.shape, spec)


@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_parallel_splits_heads_and_mlp(name, specs):
    kernels = 0
    for path, leaf in boxed(name).items():
        if path[-1] != "kernel" or path[-2] == "lm_head":
            continue
        spec = specs[name]["fsdp4_tp2"]["/".join(path)]
        inner = HEADS if HEADS in leaf.names else MLP
        assert axes(spec[leaf.names.index(inner)]) == ("tensor",), (path, spec)
        assert axes(spec[leaf.names.index(EMBED)]) == ("fsdp",), (path, spec)
        kernels += 1
    # stacked [L, ...]: encoder attention and MLP, decoder self- and cross-attention and MLP
    assert kernels == {"t5-v1.0": 6 + 10, "t5-v1.1": 7 + 11, "mbart": 6 + 10}[name]

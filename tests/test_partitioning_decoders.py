"""Logical axis names on GPT-2's and Llama's params (models/partitioning.py), and where parallel.shardings puts them
on an FSDP mesh and on an FSDP x tensor mesh of 8 simulated CPU devices."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from flaxtrain import parallel
from flaxtrain.models import gpt2, llama

# vocab 96 and widths 32/64 divide over 8 devices; 2 layers (the scanned axis) do not.
MODELS = {
    "gpt2": gpt2.GPT2ForCausalLM(gpt2.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    # GQA, untied head.
    "llama": llama.LlamaForCausalLM(llama.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, max_position_embeddings=32)),
}
FAMILIES = {"gpt2": gpt2, "llama": llama}
SCANNED = {"gpt2": "transformer/h/", "llama": "model/layers/"}


def boxed(name):
    """{"a/b/kernel": LogicallyPartitioned} of the abstract params, boxes kept."""
    params = jax.eval_shape(functools.partial(FAMILIES[name].init_params, MODELS[name], unbox=False),
                            jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_param_has_one_logical_name_per_dimension(name):
    params = boxed(name)
    assert ("lm_head/kernel" in params) == (name == "llama")
    for path, leaf in params.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names, leaf.value.shape)
        assert set(leaf.names) <= set(parallel.RULES), (path, leaf.names)
        assert (leaf.names[0] == "layers") == path.startswith(SCANNED[name]), (path, leaf.names)
    # The default unboxes: the same tree, plain arrays.
    plain = jax.eval_shape(functools.partial(FAMILIES[name].init_params, MODELS[name]), jax.random.key(0))
    flat = {"/".join(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(plain)[0]}
    assert {p: x.shape for p, x in flat.items()} == {p: leaf.value.shape for p, leaf in params.items()}


SHARDINGS = """
import json
from flaxtrain import parallel
from tests.test_partitioning_decoders import MODELS, boxed

out = {}
for fsdp, tensor in [(8, 1), (4, 2)]:
    mesh = parallel.make_mesh(fsdp=fsdp, tensor_parallel=tensor)
    for name in MODELS:
        params = boxed(name)
        shardings = parallel.shardings(params, mesh, parallel.RULES)
        out[f"{name} {fsdp}x{tensor}"] = {
            path: {"spec": [list(a) if isinstance(a, tuple) else a for a in shardings[path].spec],
                   "shape": leaf.value.shape, "shard": shardings[path].shard_shape(leaf.value.shape)}
            for path, leaf in params.items()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def layouts():
    """{"gpt2 8x1": {path: {"spec", "shape", "shard"}}, ...} from a process with 8 simulated CPU devices."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", SHARDINGS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(MODELS))
def test_fsdp_splits_every_param_that_divides(layouts, name):
    """With --fsdp 8 each param whose width divides by 8 (all of them here) takes 1/8 of the memory per device."""
    for path, leaf in layouts[f"{name} 8x1"].items():
        if any(size % 8 == 0 for size in leaf["shape"]):
            size, shard = (functools.reduce(lambda a, b: a * b, s, 1) for s in (leaf["shape"], leaf["shard"]))
            assert shard * 8 == size, (path, leaf)


TENSOR = {  # [L, in, out] kernels: heads and MLP split over tensor, the model width over fsdp
    "gpt2": {"transformer/h/attn/c_attn/kernel": [None, "fsdp", "tensor"],
             "transformer/h/attn/c_proj/kernel": [None, "tensor", "fsdp"],
             "transformer/h/mlp/c_fc/kernel": [None, "fsdp", "tensor"],
             "transformer/h/mlp/c_proj/kernel": [None, "tensor", "fsdp"],
             "transformer/wte/embedding": ["tensor", "fsdp"]},
    "llama": {**{f"model/layers/self_attn/{p}_proj/kernel": [None, "fsdp", "tensor"] for p in "qkv"},
              "model/layers/self_attn/o_proj/kernel": [None, "tensor", "fsdp"],
              "model/layers/mlp/gate_proj/kernel": [None, "fsdp", "tensor"],
              "model/layers/mlp/up_proj/kernel": [None, "fsdp", "tensor"],
              "model/layers/mlp/down_proj/kernel": [None, "tensor", "fsdp"],
              "model/embed_tokens/embedding": ["tensor", "fsdp"],
              "lm_head/kernel": ["fsdp", "tensor"]},
}


@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_parallel_splits_heads_mlp_and_vocab(layouts, name):
    layout = layouts[f"{name} 4x2"]
    for path, spec in TENSOR[name].items():
        assert layout[path]["spec"] == spec, (path, layout[path])
    # Biases and norms follow their dimension: no leaf is left whole on a mesh whose axes divide it.
    for path, leaf in layout.items():
        assert "fsdp" in json.dumps(leaf["spec"]), (path, leaf)

"""Sharded Hugging Face checkpoints: transformers' model-0000i-of-0000N.safetensors load tensor by tensor, leaf by leaf
(each leaf handed to a `place` hook); our exports split into shards that transformers loads, written the same from
numpy params, from params sharded over 8 devices and from params split across 2 processes."""

import filecmp
import functools
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.numpy  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_export, hf_io  # noqa: E402
from flaxtrain.models import bert, get_family  # noqa: E402
from tests.tiny import run_script  # noqa: E402

SHARD = "20KB"  # the tiny models below hold ~60 KB of float32 weights: several shards
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
CONFIGS = {
    "llama": dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bert": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=32, initializer_range=0.2),
}


@functools.cache
def torch_checkpoint(model_type, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to in 20 KB shards)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **CONFIGS[model_type])
    auto = transformers.AutoModelForCausalLM if model_type == "llama" else transformers.AutoModelForMaskedLM
    model = auto.from_config(config).eval()
    path = os.path.join(tmp_root, model_type)
    model.save_pretrained(path, max_shard_size=SHARD)
    return model, path


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


def ours(config):
    """(our model, an eval_shape'd template of its params) for a transformers config."""
    if config.model_type == "bert":
        model, init_params = bert.BertForMaskedLM(bert.BertConfig.from_hf(config)), bert.init_params
    else:
        family = get_family(config.model_type)
        model, init_params = family.heads["CausalLM"](family.config.from_hf(config)), family.init_params
    return model, jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))


IDS = np.random.default_rng(0).integers(3, 99, (3, 9))


def our_logits(model, params):
    mask = np.ones_like(IDS)
    inputs = (IDS, mask, np.zeros_like(IDS)) if isinstance(model, bert.BertForMaskedLM) else (IDS, mask)
    return np.asarray(jax.jit(model.apply)({"params": params}, *inputs))


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def on_devices(path, array):
    """A `place` hook as a sharded run writes one: the leaf split over a 1-D mesh of all devices on its first axis
    that the device count divides, else replicated."""
    mesh = Mesh(np.array(jax.devices()), ("devices",))
    axis = next((i for i, n in enumerate(array.shape) if n % mesh.size == 0), None)
    spec = PartitionSpec() if axis is None else PartitionSpec(*[None] * axis, "devices")
    return jax.device_put(array, NamedSharding(mesh, spec))


def weight_map(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


@pytest.mark.parametrize("place", [None, on_devices], ids=["numpy", "on_devices"])
@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_sharded_checkpoint_loads_with_their_logits(model_type, place, tmp_root):
    reference, path = torch_checkpoint(model_type, tmp_root)
    shards = [f for f in os.listdir(path) if SHARD_FILE.fullmatch(f)]
    assert len(shards) > 1 and not os.path.exists(os.path.join(path, "model.safetensors"))
    assert set(weight_map(path).values()) == set(shards)
    model, template = ours(reference.config)
    params = hf_io.load_pretrained(path, template, model_type=model_type, place=place)
    assert all(isinstance(x, np.ndarray if place is None else jax.Array) for x in jax.tree.leaves(params))
    np.testing.assert_allclose(our_logits(model, params), torch_logits(reference), atol=1e-5, rtol=1e-5)


def test_loading_reads_each_leaf_just_before_placing_it(tmp_root, monkeypatch):
    """Host memory holds one leaf at a time: the tensors of a leaf (one per layer when stacked) are read right before
    it is placed, each tensor once, and no shard is ever read whole."""
    reference, path = torch_checkpoint("llama", tmp_root)
    events = []
    safe_open = safetensors.safe_open

    class LoggedReads:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, key):
            events.append(("read", key))
            return self.file.get_tensor(key)

    def place(path, array):
        events.append(("place", path))
        return array

    monkeypatch.setattr(safetensors, "safe_open", LoggedReads)
    monkeypatch.setattr(safetensors.numpy, "load_file", lambda *a, **k: pytest.fail("a shard was read whole"))
    model, template = ours(reference.config)
    params = hf_io.load_pretrained(path, template, model_type="llama", place=place)

    reads = []
    for kind, what in events:
        if kind == "read":
            reads.append(what)
            continue
        name = {"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(what[-1], what[-1])
        leaf_key = ".".join((*what[:-1], name))  # e.g. model.layers.self_attn.q_proj.weight for layers.{i}
        assert reads and all(re.sub(r"\.\d+\.", ".", key) == leaf_key for key in reads), (what, reads)
        reads = []
    assert reads == []
    assert sorted(what for kind, what in events if kind == "read") == sorted(weight_map(path))
    assert len([kind for kind, _ in events if kind == "place"]) == len(jax.tree.leaves(params))
    np.testing.assert_allclose(our_logits(model, params), torch_logits(reference), atol=1e-5, rtol=1e-5)


def test_export_in_shards_that_transformers_loads(tmp_root, tmp_path):
    reference, path = torch_checkpoint("llama", tmp_root)
    model, template = ours(reference.config)
    rng = np.random.default_rng(1)  # perturbed, so that the check does not depend on the load path
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype),
                          hf_io.load_pretrained(path, template, model_type="llama"))
    export = functools.partial(hf_export.save_pretrained, str(tmp_path), params, reference.config,
                               architecture=model.hf_architecture)

    export(max_shard_size=SHARD)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in os.listdir(tmp_path) if SHARD_FILE.fullmatch(f))
    assert len(shards) > 2 and sorted(os.listdir(tmp_path)) == ["config.json", *shards, "model.safetensors.index.json"]
    assert index["weight_map"].keys() == weight_map(path).keys() and set(index["weight_map"].values()) == set(shards)
    sizes = [[a.nbytes for a in safetensors.numpy.load_file(str(tmp_path / f)).values()] for f in shards]
    assert all(sum(s) <= 20_000 or len(s) == 1 for s in sizes)  # "20KB" is 20 * 10**3 bytes, as in transformers
    assert index["metadata"]["total_size"] == sum(map(sum, sizes))
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    np.testing.assert_allclose(our_logits(model, params), torch_logits(loaded.eval()), atol=1e-5, rtol=1e-5)

    export()  # 5 GiB shards: one file, and nothing left of the sharded export
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    single = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in single.state_dict().items())

    export(max_shard_size=SHARD, save_dtype="bfloat16")
    assert "model.safetensors" not in os.listdir(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    for shard in weight_map(tmp_path).values():
        with safetensors.safe_open(str(tmp_path / shard), framework="numpy") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    in_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert in_bf16.dtype == torch.bfloat16
    for key, value in in_bf16.state_dict().items():  # rounded to nearest even, as torch rounds
        assert torch.equal(value, loaded.state_dict()[key].to(torch.bfloat16)), key


def test_shard_sizes_read_as_transformers_reads_them():
    assert hf_export._size_in_bytes(123) == 123
    assert hf_export._size_in_bytes("200KB") == 200_000 and hf_export._size_in_bytes("5GB") == 5 * 10**9
    assert hf_export._size_in_bytes("1.5mb") == 1_500_000 and hf_export._size_in_bytes("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="max_shard_size='5 gigs'"):
        hf_export._size_in_bytes("5 gigs")


# Loads the tiny Llama at argv[1] with every leaf split over all devices of the job (across processes when there are
# several), and exports it to argv[2]/p{process index} in 20 KB shards: only process 0 may write.
EXPORT_SPLIT = """
import functools, os, sys
import jax, numpy as np, transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flaxtrain import hf_export, hf_io
from flaxtrain.models import get_family

if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
checkpoint, output_dir = sys.argv[1:]
mesh = Mesh(np.array(jax.devices()), ("devices",))

def split(path, array):
    axis = next(i for i, n in enumerate(array.shape) if n % mesh.size == 0)
    sharding = NamedSharding(mesh, PartitionSpec(*[None] * axis, "devices"))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

config = transformers.AutoConfig.from_pretrained(checkpoint)
family = get_family("llama")
model = family.heads["CausalLM"](family.config.from_hf(config))
template = jax.eval_shape(functools.partial(family.init_params, model), jax.random.key(0))
params = hf_io.load_pretrained(checkpoint, template, model_type="llama", place=split)
leaves = jax.tree.leaves(params)
assert jax.device_count() == 8 and all(len(x.addressable_shards) == jax.local_device_count() for x in leaves)
print("leaves not fully addressable:", sum(not x.is_fully_addressable for x in leaves), "of", len(leaves))
hf_export.save_pretrained(f"{output_dir}/p{jax.process_index()}", params, config, architecture=model.hf_architecture,
                      max_shard_size="20KB")
"""


@pytest.mark.parametrize("processes", [1, 2], ids=["8_devices", "2_processes_x_4_devices"])
def test_export_of_split_params_is_the_numpy_export(processes, tmp_root, tmp_path):
    reference, path = torch_checkpoint("llama", tmp_root)
    model, template = ours(reference.config)
    config = transformers.AutoConfig.from_pretrained(path)
    expected = str(tmp_path / "from_numpy")
    hf_export.save_pretrained(expected, hf_io.load_pretrained(path, template, model_type="llama"), config,
                          architecture=model.hf_architecture, max_shard_size=SHARD)
    script = tmp_path / "export_split.py"
    script.write_text(EXPORT_SPLIT)
    done = run_script(str(script), [path, tmp_path / "split"], devices=8 // processes,
                      processes=processes if processes > 1 else None, timeout=120)
    hosts = done if isinstance(done, list) else [done]
    split_leaves = int(re.search(r"not fully addressable: (\d+)", hosts[0].stdout)[1])
    assert (split_leaves > 0) == (processes > 1)
    assert sorted(os.listdir(tmp_path / "split")) == ["p0"]  # process 1 wrote nothing
    written = tmp_path / "split" / "p0"
    assert sorted(os.listdir(written)) == sorted(os.listdir(expected))
    assert len(os.listdir(written)) > 3  # config.json, index and shards
    for name in os.listdir(expected):
        assert filecmp.cmp(written / name, os.path.join(expected, name), shallow=False), name

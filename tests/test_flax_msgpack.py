"""Checkpoints the original Hugging Face Flax scripts saved (flax_model.msgpack, or its shards with
flax_model.msgpack.index.json) load into our models and give the original model's logits.

The fixtures in tests/fixtures/original_flax/ are the original Flax models' own `save_pretrained` output and logits,
written by make_fixtures.py there with transformers 4.57 (the last with Flax models). Fixtures of model types that
flaxtrain.models does not implement yet are listed by a skipped test, so the gap shows in the test output. Also: the
scripts' loading helper, the sharded form, half-precision arrays, safetensors before msgpack, a Hub repo with only
msgpack, and corrupt files.
"""

import functools
import importlib.util
import inspect
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from flax import serialization, traverse_util  # noqa: E402

from flaxtrain import flax_msgpack, hf_export, hf_io, pretrained, settings  # noqa: E402
from flaxtrain.models import FAMILIES, create  # noqa: E402
from tests.fake_hub import FakeHub, Repo  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "original_flax")
# Every fixture that make_fixtures.py writes with its logits: {name: folder}.
FIXTURES = {name: os.path.join(ROOT, name) for name in sorted(os.listdir(ROOT))
            if os.path.exists(os.path.join(ROOT, name, "logits.npz"))}
TOKEN = "hf_fake_token"
# The model types of the original's Flax auto classes for masked LM, causal LM and seq2seq.
ORIGINAL_TYPES = {"bert", "roberta", "xlm-roberta", "roberta-prelayernorm", "electra", "distilbert", "albert",
                  "big_bird", "roformer", "gpt2", "gpt_neo", "gptj", "opt", "bloom", "xglm", "llama", "mistral",
                  "gemma", "t5", "mt5", "longt5", "bart", "mbart", "pegasus", "marian", "blenderbot",
                  "blenderbot-small"}


@functools.cache
def fixture(name):
    """(transformers config, head, {array name: array} of logits.npz) of a fixture."""
    path = FIXTURES[name]
    saved = dict(np.load(os.path.join(path, "logits.npz")))
    return transformers.AutoConfig.from_pretrained(path), str(saved.pop("head")), saved


def implemented(name) -> bool:
    config, head, _ = fixture(name)
    return config.model_type in FAMILIES and head in FAMILIES[config.model_type].heads


@functools.cache
def ours(name):
    """(our model, a template of its params) for a fixture's config and head. The template is eval_shape'd, but
    init'd (as the scripts pass it) where the original's heads lacked weights that ours have: those keep its values."""
    config, head, _ = fixture(name)
    family, model = create(config, head)
    init = functools.partial(family.init_params, model)
    key = jax.random.key(0, impl="rbg")
    return model, init(key) if config.model_type in flax_msgpack.ABSENT else jax.eval_shape(init, key)


def load(name, path=None, **kwargs):
    model, template = ours(name)
    return hf_io.load_pretrained(path or FIXTURES[name], template, model_type=fixture(name)[0].model_type, **kwargs)


def assert_original_logits(name, params):
    """Our logits equal the original's, on real tokens (the decoder's for seq2seq); whole rows for a classifier."""
    model, _ = ours(name)
    _, head, saved = fixture(name)
    takes = inspect.signature(model.__call__).parameters
    # token_type_ids are zeros (what our heads default to); passed to the heads that take them.
    inputs = {k: v for k, v in saved.items() if k != "logits" and (k != "token_type_ids" or k in takes)}
    logits = np.asarray(jax.jit(model.apply)({"params": params}, **inputs))
    expected = saved["logits"]
    if head != "SequenceClassification":
        real = (inputs.get("decoder_attention_mask", inputs["attention_mask"]) == 1)
        logits, expected = logits[real], expected[real]
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def assert_same_params(a, b):
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))


def test_fixtures_are_there_and_small():
    assert {fixture(name)[0].model_type for name in FIXTURES} == ORIGINAL_TYPES, (
        f"run tests/fixtures/original_flax/make_fixtures.py with transformers 4.57 (found {sorted(FIXTURES)})")
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ROOT) for f in files)
    assert size < 2 * 2**20


@pytest.mark.parametrize("name", [n for n in FIXTURES if implemented(n)])
def test_original_checkpoint_gives_the_original_logits(name):
    assert os.listdir(FIXTURES[name]).count(flax_msgpack.WEIGHTS) == 1
    assert_original_logits(name, load(name))


def test_model_types_not_implemented_yet():
    missing = [f"{name} ({fixture(name)[0].model_type} {fixture(name)[1]})" for name in FIXTURES
               if not implemented(name)]
    if missing:
        pytest.skip(f"original Flax checkpoints of model types/heads we do not have yet: {', '.join(missing)}")


def test_the_scripts_loading_helper_reads_msgpack():
    source = settings.ModelSource(FIXTURES["bert"])
    _, template = ours("bert")
    assert_original_logits("bert", pretrained.load_weights(source, template, model_type="bert"))


def test_sharded_checkpoint_loads_equal_to_the_whole_one():
    sharded = os.path.join(ROOT, "bert-sharded")
    files = os.listdir(sharded)
    assert flax_msgpack.INDEX in files and flax_msgpack.WEIGHTS not in files
    assert len([f for f in files if f.startswith("flax_model-")]) > 1
    assert_same_params(load("bert", sharded), load("bert"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_into_float32_params(dtype, tmp_path):
    """The original saved params in their own dtype (e.g. after `model.to_bf16(params)`): loaded, cast to float32."""
    with open(os.path.join(FIXTURES["bert"], flax_msgpack.WEIGHTS), "rb") as f:
        params = serialization.msgpack_restore(f.read())
    half = jax.tree.map(lambda x: np.asarray(x, getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16),
                        params)
    shutil.copy(os.path.join(FIXTURES["bert"], "config.json"), tmp_path)
    (tmp_path / flax_msgpack.WEIGHTS).write_bytes(serialization.msgpack_serialize(half))
    loaded = load("bert", str(tmp_path))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded))
    rounded = jax.tree.map(lambda x: np.asarray(x, np.float32).astype(jnp.dtype(dtype)).astype(np.float32),
                           load("bert"))
    assert_same_params(loaded, rounded)


def test_safetensors_comes_before_msgpack(tmp_path):
    shutil.copytree(FIXTURES["bert"], tmp_path, dirs_exist_ok=True)
    config, _, _ = fixture("bert")
    model, _ = ours("bert")
    rng = np.random.default_rng(1)
    other = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), load("bert"))
    hf_export.save_pretrained(str(tmp_path), other, config, architecture=model.hf_architecture)
    assert {flax_msgpack.WEIGHTS, "model.safetensors"} <= set(os.listdir(tmp_path))
    assert_same_params(load("bert", str(tmp_path)), other)


def test_without_torch_msgpack_comes_before_a_pytorch_pickle(tmp_path, monkeypatch):
    """Many of the original scripts' Hub repos hold pytorch_model.bin and flax_model.msgpack; on a machine without
    torch (a TPU VM) the msgpack is read."""
    torch = pytest.importorskip("torch")
    shutil.copytree(FIXTURES["bert"], tmp_path / "both")
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(3, 3)}, tmp_path / "both/pytorch_model.bin")
    with pytest.raises(ValueError):  # with torch, the (deliberately wrong) pickle is what loads
        load("bert", str(tmp_path / "both"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    assert_original_logits("bert", load("bert", str(tmp_path / "both")))


@pytest.mark.parametrize("content, match", [
    (b"\x93\xa4not a params tree", "flax_model.msgpack is not a readable Flax msgpack checkpoint"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "flax_model.msgpack is a git-lfs"),
    (b"\xa5hello", "flax_model.msgpack is not a Flax msgpack checkpoint"),
], ids=["garbage", "git_lfs_pointer", "not_a_params_tree"])
def test_corrupt_msgpack_is_a_clear_error(content, match, tmp_path):
    shutil.copy(os.path.join(FIXTURES["bert"], "config.json"), tmp_path)
    (tmp_path / flax_msgpack.WEIGHTS).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load("bert", str(tmp_path))


def test_truncated_msgpack_is_a_clear_error(tmp_path):
    with open(os.path.join(FIXTURES["bert"], flax_msgpack.WEIGHTS), "rb") as f:
        data = f.read()
    (tmp_path / flax_msgpack.WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{tmp_path / flax_msgpack.WEIGHTS} is not a readable Flax msgpack"):
        load("bert", str(tmp_path))


@pytest.fixture
def hub():
    """The fake Hub, with huggingface_hub pointed at it (as tests/test_hub.py does)."""
    from huggingface_hub import constants

    server = FakeHub(token=TOKEN)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", server.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield server
    server.close()


@pytest.mark.parametrize("folder", ["bert", "bert-sharded", "pegasus"])
def test_hub_repo_with_only_msgpack_loads(folder, hub, tmp_path):
    """Pegasus: its sinusoidal tables are made from the repo's config.json, which comes down with the weights."""
    name = folder.removesuffix("-sharded")
    if not implemented(name):
        pytest.skip(f"no {name} family yet")
    files = {}
    for file in os.listdir(os.path.join(ROOT, folder)):
        if file.startswith("flax_model") or file == "config.json":
            with open(os.path.join(ROOT, folder, file), "rb") as f:
                files[file] = f.read()
    hub.repos["flax-community/tiny"] = Repo(private=False, files=files, commits=[
        {"message": "the original's save_pretrained", "added": sorted(files), "deleted": [], "oid": "a" * 40}])
    params = load(name, "flax-community/tiny", token=TOKEN, cache_dir=str(tmp_path))
    assert_original_logits(name, params)

"""FLAXTRAIN_ATTENTION=splash (flaxtrain/models/splash.py). The Pallas kernel, run in Pallas's interpreter on this CPU,
computes what XLA's attention computes at every real token, forward and backward, from the structure that the
families give it (causal, windows, padding, packed rows, grouped heads, a soft cap); under a mesh it runs in a
shard_map over rows and heads; whatever it cannot take runs XLA's attention and says why."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain.models import attention as attention_module, bert, distilbert, gemma, get_family, gpt2, llama, splash
from flaxtrain.models.attention import Structure, attention, causal_mask, select_implementation
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTH = 128  # the kernel's smallest block


@pytest.fixture
def interpreted(monkeypatch):
    """splash selected, its kernel interpreted (this CPU has no TPU)."""
    monkeypatch.setattr(splash, "INTERPRET", True)
    select_implementation("splash")
    yield
    select_implementation(None)
    attention_module.fallbacks.clear()


def heads(batch=2, length=LENGTH, n=4, k=2, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(batch, length, h, size)), jnp.float32) for h in (n, k, k)]


def segments(packed: bool) -> np.ndarray:
    """[2, LENGTH]: row 0 right-padded from 100; row 1 all tokens, or (packed) three examples then padding."""
    ids = np.ones((2, LENGTH), np.int32)
    ids[0, 100:] = 0
    if packed:
        ids[1, 40:90], ids[1, 90:120], ids[1, 120:] = 2, 3, 0
    return ids


# name -> (segments, causal, windows, which, softcap)
CASES = {
    "causal, padding, grouped heads": (segments(False), True, (None,), 0, None),
    "packed rows": (segments(True), True, (None,), 0, None),
    "sliding window": (segments(True), True, (7,), 0, None),
    "the window a layer picks": (segments(True), True, (None, 7), 1, None),
    "encoder padding": (segments(False), False, (None,), 0, None),
    "soft cap": (segments(True), True, (None,), 0, 5.0),
}


def dense_mask(ids, causal, window):
    if causal:
        return causal_mask((ids > 0).astype(np.int32), None, window, ids)[0]
    return (ids > 0)[:, None, None, :]


@pytest.mark.parametrize("case", list(CASES))
def test_splash_computes_xla_attention_at_every_real_token(case, interpreted):
    ids, causal, windows, which, softcap = CASES[case]
    q, k, v = heads()
    mask = dense_mask(ids, causal, windows[which])
    real = jnp.asarray(ids > 0)[:, :, None, None]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real

    def loss(q, k, v, which):
        out = attention(q, k, v, mask, softcap=softcap,
                        structure=Structure(jnp.asarray(ids), causal, windows, which))
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, which)
    assert attention_module.fallbacks == []
    select_implementation("xla")
    (_, expected), expected_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, which)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), atol=2e-5)
    for x, y in zip(grads, expected_grads):
        np.testing.assert_allclose(x, y, atol=2e-5)
    assert not np.allclose(np.where(real, out, 0), 0)


# A causal LM with packed rows and a window; gemma2's soft cap and its full and sliding layers, packed; GPT-2, a
# BERT and a DistilBERT encoder with padding.
MODELS = {
    "mistral": llama.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
                                 initializer_range=0.2, sliding_window=9, model_type="mistral"),
    "gemma2": gemma.GemmaConfig(vocab_size=99, hidden_size=64, intermediate_size=37, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=LENGTH,
                                query_pre_attn_scalar=20, attn_logit_softcapping=1.5, sliding_window=9,
                                layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                                model_type="gemma2"),
    "gpt2": gpt2.GPT2Config(vocab_size=99, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=2, initializer_range=0.2,
                            attn_pdrop=0.0),
    "bert": bert.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37, max_position_embeddings=LENGTH, initializer_range=0.2),
    "distilbert": distilbert.DistilBertConfig(vocab_size=99, dim=64, n_layers=2, n_heads=2, hidden_dim=37,
                                              max_position_embeddings=LENGTH, initializer_range=0.2),
}


def model_and_inputs(name):
    config = MODELS[name]
    family = get_family(config.model_type)
    model = family.heads["MaskedLM" if "bert" in name else "CausalLM"](config)
    params = family.init_params(model, jax.random.key(0))
    packed = name in ("mistral", "gemma2")
    ids = segments(packed)
    tokens = np.random.default_rng(2).integers(3, 99, ids.shape) * (ids > 0)
    inputs = dict(input_ids=tokens, attention_mask=(ids > 0).astype(np.int32))
    if packed:
        inputs["segment_ids"] = ids
    return model, params, inputs, ids > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_families_give_splash_their_structure(name, interpreted):
    """The models' logits and gradients at real tokens are XLA's: the structure each family passes is its mask."""
    model, params, inputs, real = model_and_inputs(name)

    def loss(params):
        logits = model.apply({"params": params}, **inputs)
        return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0)[..., 5]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert attention_module.fallbacks == []
    select_implementation("xla")
    (_, expected), expected_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def test_off_a_tpu_splash_is_xla_and_says_why(caplog):
    q, k, v = heads()
    ids = segments(False)
    mask = dense_mask(ids, True, None)
    expected = attention(q, k, v, mask)
    select_implementation("splash")
    try:
        with caplog.at_level("WARNING", logger=attention_module.__name__):
            out = attention(q, k, v, mask, structure=Structure(jnp.asarray(ids)))
        np.testing.assert_array_equal(out, expected)
        assert attention_module.fallbacks == ["no TPU (the backend is cpu)"]
        assert [r.getMessage() for r in caplog.records] == [
            "FLAXTRAIN_ATTENTION=splash: XLA's attention instead, no TPU (the backend is cpu)"]
    finally:
        select_implementation(None)
        attention_module.fallbacks.clear()


def test_what_splash_cannot_take_is_refused_by_name(interpreted):
    q, k, v = heads()
    structure = Structure(jnp.asarray(segments(False)))
    assert splash.refusal(q, k, None, structure) is None
    assert "a bias over the logits" in splash.refusal(q, k, jnp.zeros((1, 4, LENGTH, LENGTH)), structure)
    assert "without its structure" in splash.refusal(q, k, None, None)
    short = heads(length=100)
    assert splash.refusal(short[0], short[1], None, structure) == (
        "100 queries over 100 keys: splash takes self-attention over a multiple of 128")
    assert splash.refusal(q, short[1], None, structure).startswith("128 queries over 100 keys")


def test_generation_with_a_cache_runs_xla_attention(interpreted):
    """Reading a prompt into a cache has no structure (its keys are the cache's slots): XLA's attention, said once.
    (Shorter rows, as init's and a decoding step's, take XLA's without a word.)"""
    model, params, inputs, _ = model_and_inputs("gpt2")
    cache = model.init_cache(2, LENGTH)
    out, _ = model.apply({"params": params}, inputs["input_ids"], inputs["attention_mask"], cache=cache)
    assert out.shape == (2, LENGTH, 99)
    assert len(attention_module.fallbacks) == 1 and "without its structure" in attention_module.fallbacks[0]


MESH_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from flaxtrain import parallel
from flaxtrain.models import attention, splash
from tests.test_splash import model_and_inputs
splash.INTERPRET = True
model, params, inputs, real = model_and_inputs("mistral")
mesh = jax.make_mesh((2, 1, 2), parallel.AXES, axis_types=(AxisType.Auto,) * 3)
rows = NamedSharding(mesh, P(parallel.BATCH))
inputs = {k: jax.device_put(v, rows) for k, v in inputs.items()}

def loss(params):
    logits = model.apply({"params": params}, **inputs)
    return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0)[..., 5])

results = {}
for name in ("splash", "xla"):
    attention.select_implementation(name)
    step = jax.jit(jax.value_and_grad(loss))
    with jax.set_mesh(mesh):
        results[name] = step(params)
        text = step.lower(params).as_text()
    assert ("shard_map" in text or "sdy.manual_computation" in text) == (name == "splash"), name
assert attention.fallbacks == [], attention.fallbacks
np.testing.assert_allclose(results["splash"][0], results["xla"][0], rtol=1e-5)
for x, y in zip(jax.tree.leaves(results["splash"][1]), jax.tree.leaves(results["xla"][1])):
    np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_under_a_mesh_the_kernel_runs_on_each_devices_rows_and_heads():
    """4 devices, data 2 x tensor 2: a shard_map in the step, the same loss and gradients as XLA's attention."""
    done = subprocess.run([sys.executable, "-c", MESH_CHECK], env=tiny.script_env(4), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]



def test_a_script_trains_with_splash_as_with_xla(tmp_path, monkeypatch):
    """run_clm_flax.py on a tiny Llama, 128-token blocks: with splash (interpreted) the losses it logs and its eval
    loss are those of XLA's attention, and nothing fell back."""
    import run_clm_flax

    monkeypatch.chdir(tmp_path)
    train = tiny.write_corpus(tmp_path / "train.txt")
    model = tiny.make_decoder(tmp_path / "llama", train, "llama", max_positions=LENGTH)
    flags = [f"--train_file={train}", f"--validation_file={train}", f"--config_name={model}",
             f"--tokenizer_name={model}", f"--block_size={LENGTH}", "--do_train", "--do_eval", "--max_steps=8",
             "--logging_steps=2", "--learning_rate=3e-3", "--per_device_train_batch_size=4",
             "--max_eval_samples=12"]
    results = {}
    for name in ("splash", "xla"):
        monkeypatch.setattr(splash, "INTERPRET", name == "splash")
        select_implementation(name)
        try:
            run_clm_flax.main([f"--output_dir={name}", *flags])
        finally:
            select_implementation(None)
        results[name] = ([r["train/loss"] for r in tiny.read_history(name) if "train/loss" in r],
                         tiny.read_json(f"{name}/eval_results.json")["eval_loss"])
        if name == "splash":
            assert attention_module.fallbacks == []
    (losses, eval_loss), (expected_losses, expected_eval_loss) = results["splash"], results["xla"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4)
    np.testing.assert_allclose(eval_loss, expected_eval_loss, rtol=1e-4)

"""GPT-2 and Llama-style model code and their torch-free checkpoint rules: shapes, causal and sliding-window masks,
padding, remat, bf16, full-size param counts, config checks."""

import dataclasses
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import get_family, gpt2, llama  # noqa: E402

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU.
key = functools.partial(jax.random.key, impl="rbg")
CONFIGS = {
    "gpt2": gpt2.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2),
    # GQA, untied head, a window of 3 slots on every layer.
    "mistral": llama.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.2, sliding_window=3, model_type="mistral"),
    # Tied head, qkv biases, no window.
    "qwen2": llama.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                               initializer_range=0.2, tie_word_embeddings=True, model_type="qwen2"),
}


def causal_lm(config, **kwargs):
    return get_family(config.model_type).heads["CausalLM"](config, **kwargs)


def random_params(model, seed=0):
    """Params drawn on the host in the shapes `init_params` gives (norm scales around 1, the rest normal(0.2)):
    compiling init costs seconds per model on a small CPU. init_params itself is traced by the full-size tests."""
    shapes = jax.eval_shape(functools.partial(get_family(model.config.model_type).init_params, model), key(0))
    rng = np.random.default_rng(seed)
    draw = lambda path, s: ((path[-1].key == "scale") + rng.normal(0, 0.2, s.shape)).astype(s.dtype)  # noqa: E731
    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny(name):
    """(model, params, jitted apply): each distinct compilation costs seconds on a small CPU, so tests share them."""
    model = causal_lm(CONFIGS[name])
    return model, random_params(model), jax.jit(model.apply, static_argnames="deterministic")


def batch(seed=0, batch_size=3, length=9):
    """Random ids with right padding (row 1 from position 5, row 2 from 2); pads hold 0."""
    ids = np.random.default_rng(seed).integers(3, 99, (batch_size, length))
    mask = np.ones_like(ids)
    mask[1, 5:], mask[2, 2:] = 0, 0
    return jnp.asarray(ids * mask), jnp.asarray(mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_dtypes(name):
    model, params, _ = tiny(name)
    ids, mask = batch()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    if name == "gpt2":
        assert params["transformer"]["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
        assert "lm_head" not in params
    else:
        attn = params["model"]["layers"]["self_attn"]
        assert attn["q_proj"]["kernel"].shape == (2, 32, 32) and attn["k_proj"]["kernel"].shape == (2, 32, 16 // (
            2 if name == "qwen2" else 1))
        assert ("bias" in attn["q_proj"], "bias" in attn["o_proj"]) == ((name == "qwen2"), False)
        assert ("lm_head" in params) == (name == "mistral")
    logits = jax.eval_shape(model.apply, {"params": params}, ids, mask)
    assert logits.shape == (3, 9, 99) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal_and_padding(name):
    """Changing later tokens, or what sits under attention_mask == 0, leaves the logits of earlier real tokens as
    they were."""
    model, params, apply = tiny(name)
    ids, mask = batch()
    logits = np.asarray(apply({"params": params}, ids, mask))
    later = ids.at[:, 4:].set((ids[:, 4:] + 7) % 99)
    np.testing.assert_allclose(apply({"params": params}, later, mask)[:, :4], logits[:, :4], atol=1e-5)
    assert not np.allclose(apply({"params": params}, later, mask)[0, 4:], logits[0, 4:], atol=1e-3)
    other_pads = jnp.where(mask == 0, 5, ids)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(apply({"params": params}, other_pads, mask))[real], logits[real], atol=1e-5)


def test_sliding_window_reach():
    """With a window of 3 slots and 2 layers, token 0 reaches positions up to 2 * (3 - 1) = 4, and no further."""
    model, params, apply = tiny("mistral")
    ids, mask = batch()
    changed = ids.at[0, 0].add(1)
    delta = np.abs(apply({"params": params}, changed, mask)[0] - apply({"params": params}, ids, mask)[0]).max(-1)
    assert (delta[:5] > 1e-4).all() and (delta[5:] < 1e-6).all()


def test_dropout_rngs_and_gradient_checkpointing():
    """Dropout (attention dropout included) follows the "dropout" rng; remat (under scan) changes neither logits
    nor gradients. One family: GPT-2's scan and remat are the same two lines."""
    config = dataclasses.replace(CONFIGS["mistral"], attention_dropout=0.1)
    params = tiny("mistral")[1]
    ids, mask = batch()

    def step(module):
        def loss(p, rng):
            logits = module.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": rng})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    plain, remat = step(causal_lm(config)), step(causal_lm(config, gradient_checkpointing=True))
    (_, logits), grads = plain(params, key(1))
    assert not np.allclose(logits, plain(params, key(2))[0][1])
    (_, remat_logits), remat_grads = remat(params, key(1))
    # Recomputation fuses differently: equal up to float32 rounding.
    np.testing.assert_allclose(remat_logits, logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_bfloat16_computation(name):
    model, params, apply = tiny(name)
    ids, mask = batch()
    expected = apply({"params": params}, ids, mask)
    logits = jax.jit(causal_lm(model.config, dtype=jnp.bfloat16).apply)({"params": params}, ids, mask)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - expected).max()) < 0.05 * float(jnp.abs(expected).max())


FULL_SIZE = {  # transformers config kwargs; the defaults are gpt2 (124M), llama-7b and mistral-7b
    "gpt2": {},
    "llama": {},
    "mistral": {},
    "qwen2": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),  # Qwen2-0.5B
}


@pytest.mark.parametrize("model_type", list(FULL_SIZE))
def test_full_size_param_counts_equal_pytorch(model_type):
    """Full-size models, shapes only: the counts equal the transformers PyTorch models'."""
    torch = pytest.importorskip("torch")
    import transformers

    hf_config = transformers.AutoConfig.for_model(model_type, **FULL_SIZE[model_type])
    family = get_family(model_type)
    config = family.config.from_hf(hf_config)
    with torch.device("meta"):  # allocates nothing
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = sum(p.numel() for p in reference.parameters())  # tied weights are counted once
    shapes = jax.eval_shape(functools.partial(family.init_params, causal_lm(config)), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
    if model_type == "gpt2":
        assert expected == 124_439_808


def test_configs_from_hf_and_registry():
    import transformers

    for_model = transformers.AutoConfig.for_model
    with pytest.raises(ValueError, match="rope_type 'su_scaled'"):
        llama.LlamaConfig.from_hf(for_model("llama", rope_scaling={"rope_type": "su_scaled", "factor": 2.0}))
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2.GPT2Config.from_hf(for_model("gpt2", add_cross_attention=True))
    config = llama.LlamaConfig.from_hf(for_model("llama", rope_theta=5e5, eos_token_id=[2, 7]))
    assert (config.rope_theta, config.eos_token_id, config.layer_windows) == (5e5, (2, 7), (None,) * 32)
    # qwen2: the window applies from layer max_window_layers on, and only with use_sliding_window.
    qwen = dict(num_hidden_layers=3, sliding_window=4, max_window_layers=1)
    assert llama.LlamaConfig.from_hf(for_model("qwen2", **qwen)).layer_windows == (None,) * 3
    assert llama.LlamaConfig.from_hf(for_model("qwen2", use_sliding_window=True, **qwen)).layer_windows == (
        None, 4, 4)
    assert llama.LlamaConfig.from_hf(for_model("mistral", num_hidden_layers=2)).layer_windows == (4096, 4096)
    assert gpt2.GPT2Config.from_hf(for_model("gpt2")) == gpt2.GPT2Config()
    assert {get_family(t) for t in ("llama", "mistral", "qwen2")} == {llama.FAMILY}
    assert get_family("gpt2") is gpt2.FAMILY


def test_checkpoint_layouts(tmp_path):
    """GPT-2's Conv1D kernels are saved as they are, its untied lm_head and Llama's kernels transposed; buffers old
    checkpoints carry (rotary inv_freq) are ignored on load."""
    model, params, _ = tiny("gpt2")
    state = hf_io.params_to_state_dict(params, scanned=gpt2.FAMILY.hf.scanned,
                                       untransposed=gpt2.FAMILY.hf.untransposed)
    np.testing.assert_array_equal(state["transformer.h.1.attn.c_attn.weight"],
                                  params["transformer"]["h"]["attn"]["c_attn"]["kernel"][1])
    assert "lm_head.weight" not in state

    model, params, _ = tiny("mistral")
    state = hf_io.params_to_state_dict(params, scanned=llama.FAMILY.hf.scanned)
    np.testing.assert_array_equal(state["model.layers.1.self_attn.k_proj.weight"],
                                  params["model"]["layers"]["self_attn"]["k_proj"]["kernel"][1].T)
    np.testing.assert_array_equal(state["lm_head.weight"], params["lm_head"]["kernel"].T)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
    loaded = hf_io.load_pretrained(str(tmp_path), params, model_type="mistral")
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)

"""RoPE scaling (models/rope.py) against transformers 5: the cos/sin tables of every rope_type, Llama logits past
the original context length for llama3, linear, dynamic, yarn and longrope, greedy generation whose positions cross
the length where dynamic and longrope change their frequencies, and Llama-3.2-1B's parameter count."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate  # noqa: E402
from flaxtrain.models import create, llama, rope  # noqa: E402
from tests.parity import assert_close, load_ours, param_count, torch_logits, torch_param_count  # noqa: E402
from tests.test_generate import hf_greedy, prompts  # noqa: E402

COMMON = dict(vocab_size=99, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
LONG = [1.0, 1.5, 3.0, 7.0]  # longrope factors: one per frequency of head_dim 8
SCALINGS = {
    # Llama-3.2-1B's values, with a short original context so that a medium-frequency band exists at head_dim 8.
    "llama3": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "linear": dict(max_position_embeddings=16, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=100.0)),
    "dynamic": dict(max_position_embeddings=16, rope_parameters=dict(rope_type="dynamic", factor=3.0)),
    "yarn": dict(max_position_embeddings=64, rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=100.0,
                                                                  original_max_position_embeddings=16)),
    "longrope": dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="longrope", short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=LONG,
        original_max_position_embeddings=16)),
}
# Generation crosses position 8: where these switch.
SCALINGS["dynamic-8"] = dict(SCALINGS["dynamic"], max_position_embeddings=8)
SCALINGS["longrope-8"] = dict(SCALINGS["longrope"], rope_parameters=dict(
    SCALINGS["longrope"]["rope_parameters"], original_max_position_embeddings=8))


def hf_config(name, **changes):
    return transformers.AutoConfig.for_model("llama", **{**COMMON, **SCALINGS[name], **changes})


def ids_and_mask():
    """[2, 24] ids and mask (24 > every original context length above): row 1 left-padded by 3, right by 2."""
    ids = np.random.default_rng(0).integers(3, 99, (2, 24))
    mask = np.ones_like(ids)
    mask[1, :3], mask[1, -2:] = 0, 0
    return ids * mask, mask


@functools.cache
def checkpoint(name, tmp_root):
    """The directory a fresh PyTorch Llama with this scaling saved itself to, and our (model, params) of it."""
    torch.manual_seed(0)
    config = hf_config(name)
    path = os.path.join(tmp_root, name)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return (path, *load_ours(config, "CausalLM", path))


def fresh_torch(path):
    """A newly loaded PyTorch model: dynamic RoPE keeps its grown base between calls, so never reuse one."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("name", ["default", "llama3", "linear", "dynamic", "yarn", "longrope"])
def test_tables_equal_transformers(name):
    """cos/sin of every rope_type, below and past the original context, with partial rotary for longrope as Phi-3
    has it (the frequencies of the first half of each head)."""
    if name == "default":
        config = transformers.AutoConfig.for_model("llama", **COMMON, rope_theta=300.0)
        module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    elif name == "longrope":
        config = transformers.AutoConfig.for_model("phi3", **COMMON, partial_rotary_factor=0.5, **dict(
            SCALINGS[name], original_max_position_embeddings=16,
            rope_parameters=dict(SCALINGS[name]["rope_parameters"], short_factor=[1.0, 2.0], long_factor=[3, 5])))
        module = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(config)
    else:
        config = hf_config(name)
        module = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
    params = rope.rope_parameters(config)
    for length in (10, 16, 17, 40):  # each a fresh module: transformers' dynamic state would carry over
        module.__init__(config)
        positions = np.arange(length)[None]
        expected = module(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
        got = rope.rope_tables(jnp.asarray(positions), 8, params, config.max_position_embeddings, jnp.float32)
        for x, y in zip(got, expected):
            np.testing.assert_allclose(np.asarray(x), y.numpy(), atol=2e-6, rtol=1e-5, err_msg=f"length {length}")


@pytest.mark.parametrize("name", ["llama3", "linear", "dynamic", "yarn", "longrope"])
def test_logits_past_original_context(name, tmp_root):
    path, model, params = checkpoint(name, tmp_root)
    reference = fresh_torch(path)
    assert model.config.rope["rope_type"] == name
    ids, mask = ids_and_mask()
    assert_close(jax.jit(model.apply)({"params": params}, ids, mask), torch_logits(reference, ids, mask), mask)


def assert_cached_steps_equal_generate(reference, model, params, steps=6):
    """Our prefill and cached steps, fed transformers' greedy tokens, give the logits of its `generate` at every
    step (min_new_tokens: no row ends early). Prompts of 6, 4 and 1 tokens, left-padded."""
    ids, mask = prompts()
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences.numpy()[:, ids.shape[1]:]
    step = jax.jit(functools.partial(model.apply, {"params": params}))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits, cache = step(ids, mask, positions, cache=model.init_cache(len(ids), ids.shape[1] + steps))
    got = [logits[:, -1]]
    for t in range(steps - 1):
        positions = positions[:, -1:] + 1
        logits, cache = step(new[:, t:t + 1], np.ones_like(positions), positions, cache=cache)
        got.append(logits[:, 0])
    expected = np.stack([x.numpy() for x in out.logits], 1)
    np.testing.assert_allclose(np.stack(got, 1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dynamic-8", "longrope-8"])
def test_generation_across_the_switch(name, tmp_root):
    """Positions pass 8 during generation, where the frequencies change: dynamic grows its base at each cached
    step past max_position_embeddings, longrope takes its long factors (Llama keeps its cache across the switch,
    unlike Phi-3)."""
    path, model, params = checkpoint(name, tmp_root)
    assert_cached_steps_equal_generate(fresh_torch(path), model, params)
    ids, mask = prompts()
    ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=10, eos_token_id=2))
    np.testing.assert_array_equal(ours, hf_greedy(fresh_torch(path), ids, mask, 10, 2))


def test_refusals():
    for_model = transformers.AutoConfig.for_model
    with pytest.raises(ValueError, match="rope_type 'su_scaled'"):
        llama.LlamaConfig.from_hf(for_model("llama", rope_parameters={"rope_type": "su_scaled", "factor": 2.0}))
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        llama.LlamaConfig.from_hf(for_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                      "partial_rotary_factor": 0.5}))


def test_llama_3_2_1b_parameter_count():
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192))
    _, model = create(config, "CausalLM")
    assert param_count(model) == torch_param_count(transformers.AutoModelForCausalLM, config) == 1_235_814_400

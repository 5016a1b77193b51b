"""Generation with the key/value cache: token-for-token equal to transformers' greedy `generate`, cached steps equal
to recomputing without a cache (sliding window included), sampling reproducible, the filters as transformers'."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from flaxtrain import generate, hf_io  # noqa: E402
from flaxtrain.models import get_family, gpt2, llama  # noqa: E402
from tests.test_decoders import key, tiny  # noqa: E402

HF_CONFIGS = {
    "gpt2": dict(n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "llama": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64),
}


def prompts():
    """[3, 6] left-padded prompts of 6, 4 and 1 tokens (pads hold 0)."""
    ids = np.random.default_rng(0).integers(3, 99, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2], mask[2, :5] = 0, 0
    return ids * mask, mask


@functools.cache
def torch_and_ours(model_type, tmp_root):
    """(PyTorch model, our model, our params loaded from its checkpoint)."""
    torch = pytest.importorskip("torch")
    import transformers

    config = transformers.AutoConfig.for_model(model_type, vocab_size=99, initializer_range=0.2, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2, **HF_CONFIGS[model_type])
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = os.path.join(tmp_root, model_type)
    reference.save_pretrained(path)
    model = (gpt2.GPT2ForCausalLM(gpt2.GPT2Config.from_hf(config)) if model_type == "gpt2"
             else llama.LlamaForCausalLM(llama.LlamaConfig.from_hf(config)))
    template = jax.eval_shape(functools.partial(get_family(model_type).init_params, model), jax.random.key(0))
    return reference, model, hf_io.load_pretrained(path, template, model_type=model_type)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


def hf_greedy(reference, ids, mask, max_new_tokens, eos_token_id):
    """transformers' greedy tokens after the prompt, padded with 0 to max_new_tokens (it stops when all rows end)."""
    import torch

    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=0).numpy()
    new = out[:, ids.shape[1]:]
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_greedy_equals_transformers(model_type, tmp_root):
    reference, model, params = torch_and_ours(model_type, tmp_root)
    ids, mask = prompts()
    ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=2))
    np.testing.assert_array_equal(ours, hf_greedy(reference, ids, mask, 8, 2))
    # Make row 0 end early: its third token becomes an end-of-sequence token, and what follows it padding.
    eos = int(ours[0, 2])
    ended = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=[eos, 2]))
    np.testing.assert_array_equal(ended, hf_greedy(reference, ids, mask, 8, [eos, 2]))
    first = list(ours[0]).index(eos)
    assert ended[0, first] == eos and (ended[0, first + 1:] == 0).all()


def test_cached_steps_equal_recomputing():
    """A prefill of left-padded prompts and then one token at a time through the cache give the logits of one
    uncached pass over the whole sequence, with a window (3 slots) shorter than the sequence. (GPT-2's cache is the
    same code, and its greedy generation equals transformers'.)"""
    model, params, apply = tiny("mistral")
    ids, mask = prompts()
    more = np.random.default_rng(1).integers(3, 99, (3, 4))
    full_ids, full_mask = np.concatenate([ids, more], 1), np.concatenate([mask, np.ones_like(more)], 1)
    positions = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    expected = np.asarray(apply({"params": params}, full_ids, full_mask, positions))

    step = jax.jit(functools.partial(model.apply, {"params": params}))
    logits, cache = step(ids, mask, positions[:, :6], cache=model.init_cache(3, 10))
    got = [logits]
    for t in range(6, 10):
        logits, cache = step(full_ids[:, t:t + 1], full_mask[:, t:t + 1], positions[:, t:t + 1], cache=cache)
        got.append(logits)
    assert int(cache["index"]) == 10
    real = full_mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(got, 1)[real], expected[real], atol=1e-5, rtol=1e-5)


def test_unrolled_steps_equal_the_scan():
    """The decoding loop's per-layer layout (generate.unroll_layers: GPT-2's blocks unrolled, each on its own weights
    and cache buffers) computes what the scanned layers compute on the stacked cache: logits and cache."""
    model, params, apply = tiny("gpt2")
    ids, mask = prompts()
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    _, cache = apply({"params": params}, ids, mask, positions, cache=model.init_cache(3, 9))
    split_params, split_cache = generate.unroll_layers(model, params, cache)
    assert len(split_cache["self"]) == 2 and split_cache["self"][0]["key"].shape == (3, 9, 4, 8)
    token, ones, position = ids[:, -1:] + 1, np.ones((3, 1), np.int32), positions[:, -1:] + 1
    expected, stacked = apply({"params": params}, token, ones, position, cache=cache)
    got, unrolled = apply({"params": split_params}, token, ones, position, cache=split_cache)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.stack([layer["key"] for layer in unrolled["self"]]), stacked["self"]["key"],
                               atol=1e-6)
    np.testing.assert_array_equal(unrolled["mask"], stacked["mask"])


def test_generate_under_a_callers_jit():
    model, params, _ = tiny("gpt2")
    ids, mask = prompts()
    run = functools.partial(generate.generate, model, max_new_tokens=4, eos_token_id=2)
    np.testing.assert_array_equal(jax.jit(run)(params, ids, mask), run(params, ids, mask))


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, params, _ = tiny("mistral")
    ids, mask = prompts()
    sample = functools.partial(generate.generate, model, params, ids, mask, max_new_tokens=6, do_sample=True)
    first = np.asarray(sample(rng=key(1), temperature=2.0))
    np.testing.assert_array_equal(np.asarray(sample(rng=key(1), temperature=2.0)), first)
    assert not np.array_equal(np.asarray(sample(rng=key(2), temperature=2.0)), first)
    greedy = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=6))
    np.testing.assert_array_equal(np.asarray(sample(rng=key(3), top_k=1)), greedy)


def test_process_logits_filters_as_transformers():
    """Temperature, then top-k, then top-p keeping the smallest set of most likely tokens whose mass reaches p."""
    probs = np.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    process = jax.jit(generate.process_logits)  # the settings are traced: one compilation for all of them
    kept = lambda top_k=0, top_p=1.0: np.isfinite(np.asarray(process(logits, 1.0, top_k, top_p)))  # noqa: E731
    np.testing.assert_array_equal(kept(top_k=2), [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(kept(top_p=0.7), [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(kept(top_p=0.76), [[1, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(kept(top_p=0.01), [[1, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.95), [[1, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_allclose(process(logits, 2.0, 0, 1.0), logits / 2, rtol=1e-6)


def test_refusals():
    model, params, _ = tiny("gpt2")
    ids, mask = prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate.generate(model, params, ids, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="more than GPT-2's 32 positions"):
        generate.generate(model, params, ids, mask, max_new_tokens=27)
    with pytest.raises(ValueError, match="needs an rng"):
        generate.generate(model, params, ids, mask, max_new_tokens=2, do_sample=True)

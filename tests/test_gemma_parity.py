"""Parity with transformers' PyTorch Gemma, Gemma2 and Gemma3 (text): load their checkpoints, match their logits on
padded inputs (soft-capping, sliding windows shorter than the input, q/k norms, local and global RoPE bases), write
checkpoints they load cleanly, generate what they generate, count the parameters of the real models."""

import dataclasses
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
from flaxtrain.models import create, gemma  # noqa: E402
from tests.parity import (assert_close, decoder_inputs, load_ours, param_count, round_trip, torch_logits,  # noqa: E402
                          torch_param_count)
from tests.test_generate import hf_greedy, prompts  # noqa: E402

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU.
key = functools.partial(jax.random.key, 0, impl="rbg")
# initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
COMMON = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4, max_position_embeddings=64,
              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # Multi-query attention, head_dim 16 with 4 heads in a width of 32, q/k/v/o biases, a non-default rope_theta.
    "gemma": ("gemma", dict(num_hidden_layers=2, num_key_value_heads=1, head_dim=16, attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    # Caps small enough to bite, a window of 3 slots on layers 0 and 2 (transformers' default pattern), its own
    # attention scale.
    "gemma2": ("gemma2", dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20,
                              attn_logit_softcapping=1.5, final_logit_softcapping=4.0, sliding_window=3)),
    # Local layers 0, 1, 3 with base 20, the global layer 2 with base 500 and linear RoPE scaling (as gemma-3-4b's
    # text model, factor 8); a window of 4; q/k norms. The attention cap is set but transformers' Gemma3 code never
    # applies it, nor do we.
    "gemma3_text": ("gemma3_text", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=10, attention_bias=True,
        sliding_window=4, sliding_window_pattern=3, attn_logit_softcapping=1.0, final_logit_softcapping=6.0,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 20.0}})),
}


def hf_config(name):
    model_type, settings = CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **settings})


@functools.cache
def torch_and_ours(name, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to, our model, our params loaded from there)."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(hf_config(name)).eval()
    with torch.no_grad():  # transformers starts the (1 + weight) norms at 0: give them weights to get right
        for param_name, param in reference.named_parameters():
            if "norm" in param_name:
                param.normal_(0, 0.3)
    path = os.path.join(tmp_root, name)
    reference.save_pretrained(path)
    return (reference, path, *load_ours(reference.config, "CausalLM", path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_and_checkpoints_round_trip(name, tmp_root, tmp_path):
    reference, path, model, params = torch_and_ours(name, tmp_root)
    assert model.hf_architecture == type(reference).__name__
    apply = jax.jit(model.apply)
    ids, mask = decoder_inputs()
    expected = torch_logits(reference, ids, mask)
    assert_close(apply({"params": params}, ids, mask), expected, mask)
    if model.config.final_logit_softcapping:  # the cap shapes the logits: it is not a no-op in this test
        assert np.abs(expected).max() > 0.5 * model.config.final_logit_softcapping

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path,
                                auto=transformers.AutoModelForCausalLM)
    assert_close(apply({"params": params}, ids, mask), torch_logits(loaded, ids, mask), mask)


def test_attention_softcap_and_window_matter():
    """The gemma2 test config's attention cap and window change the logits (so that its parity checks them)."""
    reference = transformers.AutoModelForCausalLM.from_config(hf_config("gemma2")).eval()
    ids, mask = decoder_inputs()
    base = torch_logits(reference, ids, mask)
    for change in ({"attn_logit_softcapping": None}, {"sliding_window": 64}):
        other = hf_config("gemma2")
        for field, value in change.items():
            setattr(other, field, value)
        changed = transformers.AutoModelForCausalLM.from_config(other).eval()
        changed.load_state_dict(reference.state_dict())
        assert np.abs(torch_logits(changed, ids, mask) - base)[mask.astype(bool)].max() > 1e-3, change


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_greedy_equals_transformers(name, tmp_root):
    """Prefill and cached steps through windows shorter than prompt + new tokens, with soft-capping."""
    reference, _, model, params = torch_and_ours(name, tmp_root)
    ids, mask = prompts()
    got = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=2))
    np.testing.assert_array_equal(got, hf_greedy(reference, ids, mask, 8, 2))


def test_training_path_with_dropout_remat_and_bf16():
    """What run_clm_flax's train step calls: attention dropout inside the capped softmax, remat, bfloat16; finite
    gradients, dropout drawn from the rng, and bf16 logits near float32's."""
    config = dataclasses.replace(gemma.GemmaConfig.from_hf(hf_config("gemma2")), attention_dropout=0.3)
    model = gemma.GemmaForCausalLM(config, dtype=jnp.bfloat16, gradient_checkpointing=True)
    params = gemma.FAMILY.init_params(model, key())
    ids, _ = decoder_inputs()

    @jax.jit
    def loss_and_grads(params, rng):
        def loss(params):
            logits = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": rng})
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, first), grads = loss_and_grads(params, jax.random.key(1, impl="rbg"))
    (_, second), _ = loss_and_grads(params, jax.random.key(2, impl="rbg"))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)) and not np.allclose(first, second)
    bf16 = model.apply({"params": params}, ids)
    f32 = gemma.GemmaForCausalLM(config).apply({"params": params}, ids)
    np.testing.assert_allclose(bf16, f32, atol=0.15)


# The real configs' values (no network): google/gemma-2b, google/gemma-2-2b, google/gemma-3-1b-pt.
REAL = {
    "gemma-2b": ("gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256)),
    "gemma-2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  query_pre_attn_scalar=256, sliding_window=4096)),
    "gemma-3-1b": ("gemma3_text", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                       head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                       rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                                       max_position_embeddings=32768)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_full_size_parameter_count(name):
    model_type, settings = REAL[name]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    assert param_count(create(config, "CausalLM")[1]) == torch_param_count(transformers.AutoModelForCausalLM, config)


def test_refusals():
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        gemma.GemmaConfig.from_hf(transformers.AutoConfig.for_model("gemma3_text", use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5"):
        gemma.GemmaConfig.from_hf(transformers.AutoConfig.for_model("gemma2", partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="rope_type 'mrope'"):
        gemma.GemmaConfig.from_hf(transformers.AutoConfig.for_model(
            "gemma3_text", rope_parameters={"full_attention": {"rope_type": "mrope", "rope_theta": 1.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1.0}}))

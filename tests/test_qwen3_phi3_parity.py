"""Parity with transformers' PyTorch Qwen3 (llama.py's qwen3 type) and Phi-3 (phi3.py): logits on padded inputs
longer than Phi-3's original context (longrope's long factors, partial rotary, sliding windows, q/k norms),
checkpoints PyTorch loads cleanly, greedy generation token for token (Phi-3's across the longrope switch, where
transformers recomputes its cache), and the parameter counts of Qwen3-0.6B and Phi-3-mini-4k-instruct."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate  # noqa: E402
from flaxtrain.models import create, get_family  # noqa: E402
from tests.parity import (assert_close, decoder_inputs, load_ours, param_count, round_trip, torch_logits,  # noqa: E402
                          torch_param_count)
from tests.test_generate import hf_greedy, prompts  # noqa: E402
from tests.test_rope_parity import assert_cached_steps_equal_generate, fresh_torch  # noqa: E402

COMMON = dict(vocab_size=99, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              intermediate_size=37, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    # head_dim 16 in a width of 32, biases on q/k/v/o, tied head, the window of 4 slots on layers 1 and 2 only.
    "qwen3": ("qwen3", dict(hidden_size=32, head_dim=16, num_hidden_layers=3, attention_bias=True,
                            use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=True,
                            max_position_embeddings=64)),
    # RoPE on half of each head (8 of 16 features), longrope past 8 positions, a window of 5 slots, untied head.
    "phi3": ("phi3", dict(hidden_size=64, num_hidden_layers=2, partial_rotary_factor=0.5, sliding_window=5,
                          max_position_embeddings=32, original_max_position_embeddings=8, rope_parameters=dict(
                              rope_type="longrope", rope_theta=100.0, short_factor=[1.0, 1.2, 1.5, 2.0],
                              long_factor=[1.0, 2.0, 5.0, 9.0]))),
}


def hf_config(name):
    model_type, settings = CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **settings})


@functools.cache
def checkpoint(name, tmp_root):
    """(directory a PyTorch model saved itself to, our model, our params loaded from it)."""
    torch.manual_seed(0)
    config = hf_config(name)
    path = os.path.join(tmp_root, name)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return (path, *load_ours(config, "CausalLM", path))


def assert_same_logits(apply, params, reference):
    """At the real tokens of [3, 12] ids, longer than Phi-3's 8 original positions: row 0 unpadded, row 1
    right-padded from 7, row 2 left-padded by 3."""
    ids, mask = decoder_inputs(length=12, right_from=7)
    assert_close(apply({"params": params}, ids, mask), torch_logits(reference, ids, mask), mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_and_checkpoints_round_trip(name, tmp_root, tmp_path):
    path, model, params = checkpoint(name, tmp_root)
    reference = fresh_torch(path)
    assert model.hf_architecture == type(reference).__name__
    apply = jax.jit(model.apply)
    assert_same_logits(apply, params, reference)

    # Our save loads in PyTorch cleanly, with the keys of theirs, and computes what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path,
                                auto=transformers.AutoModelForCausalLM)
    assert_same_logits(apply, params, loaded)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers(name, tmp_root):
    """Prompts of 6, 4 and 1 tokens, 10 new ones: Phi-3's sequence passes its 8 original positions on the way,
    at the step where transformers drops its cache and reruns the sequence with the long factors."""
    path, model, params = checkpoint(name, tmp_root)
    ids, mask = prompts()
    ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=10, eos_token_id=2))
    np.testing.assert_array_equal(ours, hf_greedy(fresh_torch(path), ids, mask, 10, 2))


REAL = {  # the real configs' values (no network)
    "Qwen3-0.6B": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                 max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                 bos_token_id=151643, eos_token_id=151645), 596_049_920),
    "Phi-3-mini-4k-instruct": ("phi3", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                            max_position_embeddings=4096, original_max_position_embeddings=4096,
                                            rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False,
                                            bos_token_id=1, eos_token_id=32000, pad_token_id=32000), 3_821_079_552),
}


@pytest.mark.parametrize("name", list(REAL))
def test_full_size_parameter_count(name):
    model_type, settings, count = REAL[name]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    _, model = create(config, "CausalLM")
    assert param_count(model) == torch_param_count(transformers.AutoModelForCausalLM, config) == count


def test_refusals():
    phi3 = get_family("phi3").config
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        phi3(rope_parameters=(("factor", 2.0), ("rope_type", "linear")))


def test_phi3_cached_steps_equal_transformers_generate(tmp_root):
    """Logits of every cached step equal those of transformers' `generate`, whose cache Phi-3 drops at the step
    that reaches 9 slots (the longrope switch): the earlier tokens' keys and values are recomputed there."""
    path, model, params = checkpoint("phi3", tmp_root)
    assert_cached_steps_equal_generate(fresh_torch(path), model, params)

"""Parity with transformers' PyTorch GPT-Neo, GPT-J and GPT-SW3 (a GPT-2): their checkpoints load and give their
logits (padding, local windows shorter than the input, partial and full rotary, tied and untied heads), our
checkpoints load in PyTorch cleanly, greedy generation is theirs token for token, full-size parameter counts are
theirs."""

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate, hf_export, hf_io, parallel  # noqa: E402
from flaxtrain.models import create, gpt2, gpt_neo, gptj  # noqa: E402
from tests.parity import (assert_close, decoder_inputs, load_ours, param_count, param_shapes, round_trip,  # noqa: E402
                          torch_logits, torch_param_count)
from tests.test_generate import hf_greedy, prompts  # noqa: E402

# initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
COMMON = dict(vocab_size=99, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # Layers global, local, local; a window of 3 slots, shorter than the 9-token inputs; tied head.
    "gpt_neo": ("gpt_neo", dict(hidden_size=32, num_layers=3, num_heads=4, max_position_embeddings=32,
                                window_size=3, attention_types=[[["global", "local"], 1], [["local"], 1]])),
    # Rotary on 4 of each head's 8 dims, an MLP width of its own, untied head with bias (GPT-J's default).
    "gptj": ("gptj", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, rotary_dim=4, n_inner=40)),
    # Rotary on the whole head; head tied to the embeddings, its bias kept.
    "gptj-tied": ("gptj", dict(n_embd=32, n_layer=2, n_head=4, n_positions=32, rotary_dim=8,
                               tie_word_embeddings=True, activation_function="gelu")),
}


def hf_config(name):
    model_type, settings = CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **settings})


@functools.cache
def loaded(name, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to, our model, our params loaded from it)."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(hf_config(name)).eval()
    path = os.path.join(tmp_root, name)
    reference.save_pretrained(path)
    return (reference, path, *load_ours(reference.config, "CausalLM", path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_and_checkpoints_round_trip(name, tmp_root, tmp_path):
    reference, path, model, params = loaded(name, tmp_root)
    assert model.hf_architecture == type(reference).__name__
    apply = jax.jit(model.apply)
    ids, mask = decoder_inputs()
    assert_close(apply({"params": params}, ids, mask), torch_logits(reference, ids, mask), mask)

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, again = round_trip(model, params, reference.config, tmp_path, path,
                               auto=transformers.AutoModelForCausalLM)
    assert_close(apply({"params": params}, ids, mask), torch_logits(again, ids, mask), mask)


@pytest.mark.parametrize("name", ["gpt_neo", "gptj"])
def test_greedy_equals_transformers(name, tmp_root):
    """Left-padded prompts of 6, 4 and 1 tokens and 8 new ones through the cache: GPT-Neo's window of 3 slots is
    shorter than every row's prompt + continuation."""
    reference, _, model, params = loaded(name, tmp_root)
    ids, mask = prompts()
    got = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=2))
    np.testing.assert_array_equal(got, hf_greedy(reference, ids, mask, 8, 2))


def test_gpt_sw3_is_gpt2(tmp_root, tmp_path):
    """transformers maps "gpt-sw3" to GPT2Config and GPT2LMHeadModel. AutoConfig.for_model("gpt-sw3") says
    model_type "gpt2"; a config.json saying "gpt-sw3" (with GPT-SW3's Megatron leftovers, which GPT-2 ignores)
    loads with model_type "gpt-sw3". Both make our GPT-2, which loads the checkpoint, gives PyTorch's logits and
    exports what PyTorch loads."""
    settings = dict(COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=32, activation_function="gelu")
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.AutoConfig.for_model("gpt-sw3", **settings)).eval()
    reference.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**saved, "model_type": "gpt-sw3", "apply_query_key_layer_scaling": True,
                   "normalize_attention_scores": True, "tokenizer_class": "GPTSw3Tokenizer"}, f)
    sw3 = transformers.AutoConfig.from_pretrained(tmp_path)
    assert sw3.model_type == "gpt-sw3" and reference.config.model_type == "gpt2"
    ids, mask = decoder_inputs()
    expected = torch_logits(reference, ids, mask)
    for config in (reference.config, sw3):
        family, model = create(config, "CausalLM")
        assert family is gpt2.FAMILY and model.hf_architecture == "GPT2LMHeadModel"
        params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type=config.model_type)
        assert_close(jax.jit(model.apply)({"params": params}, ids, mask), expected, mask)
    out = tmp_path / "export"
    hf_export.save_pretrained(str(out), params, sw3, architecture=model.hf_architecture)
    again, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(again) is transformers.GPT2LMHeadModel and {k: v for k, v in info.items() if v} == {}


# The Hub configs' values (EleutherAI/gpt-neo-1.3B, EleutherAI/gpt-j-6b), written here: the tests are offline.
FULL_SIZE = {
    "gpt-neo-1.3B": ("gpt_neo", dict(hidden_size=2048, num_layers=24, num_heads=16, window_size=256,
                                     attention_types=[[["global", "local"], 12]], vocab_size=50257,
                                     max_position_embeddings=2048, activation_function="gelu_new")),
    "gpt-j-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400,
                              n_positions=2048, activation_function="gelu_new", tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_parameter_count_equals_pytorch(name):
    model_type, settings = FULL_SIZE[name]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    assert param_count(create(config, "CausalLM")[1]) == torch_param_count(transformers.AutoModelForCausalLM, config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_param_has_a_logical_name_per_dimension(name):
    family, model = create(hf_config(name), "CausalLM")
    boxed = jax.eval_shape(functools.partial(family.init_params, model, unbox=False), jax.random.key(0, impl="rbg"))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    for path, leaf in leaves:
        path = "/".join(k.key for k in path)
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= set(parallel.RULES), (path, leaf.names)
        assert (leaf.names[0] == "layers") == path.startswith("transformer/h/"), (path, leaf.names)


def test_refusals():
    neo = hf_config("gpt_neo")
    neo.attention_layers = ["global", "sparse", "local"]
    with pytest.raises(ValueError, match=r"attention_layers \['sparse'\]"):
        gpt_neo.GPTNeoConfig.from_hf(neo)
    with pytest.raises(ValueError, match="rotary_dim None is not supported"):
        gptj.GPTJConfig(n_embd=32, n_head=4, rotary_dim=None)
    with pytest.raises(ValueError, match="rotary_dim 10 is not supported"):
        gptj.GPTJConfig(n_embd=32, n_head=4, rotary_dim=10)
    model = gpt_neo.GPTNeoForCausalLM(gpt_neo.GPTNeoConfig.from_hf(hf_config("gpt_neo")))
    with pytest.raises(ValueError, match="more than GPT-Neo's 32 positions"):
        model.init_cache(1, 33)

"""Parity with transformers' PyTorch GPT-2, Llama, Mistral and Qwen2: load their checkpoints, match their logits
(padding, grouped-query attention, sliding windows, tied and untied heads), write checkpoints they load cleanly."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import create  # noqa: E402
from tests.parity import assert_close, decoder_inputs, load_ours, param_shapes, round_trip, torch_logits  # noqa: E402

# initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
COMMON = dict(vocab_size=99, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)
CONFIGS = {
    "gpt2": ("gpt2", dict(n_positions=32, n_embd=32, n_layer=2, n_head=4)),
    "gpt2-untied": ("gpt2", dict(n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False,
                                 activation_function="gelu")),
    # GQA (2 kv heads), biases on q/k/v/o and the MLP, a non-default rope_theta, untied head.
    "llama": ("llama", dict(LLAMA, num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_theta=500.0)),
    # Multi-query attention and a window of 3 slots on every layer, shorter than the 9-token inputs.
    "mistral": ("mistral", dict(LLAMA, num_key_value_heads=1, sliding_window=3, tie_word_embeddings=False)),
    # q/k/v biases, tied head, the window on layers 1 and 2 only (max_window_layers=1).
    "qwen2": ("qwen2", dict(LLAMA, num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True,
                            sliding_window=4, max_window_layers=1, tie_word_embeddings=True)),
}


def hf_config(name):
    model_type, settings = CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **{**COMMON, **settings})


@functools.cache
def torch_checkpoint(name, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name)).eval()
    path = os.path.join(tmp_root, name)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_and_checkpoints_round_trip(name, tmp_root, tmp_path):
    reference, path = torch_checkpoint(name, tmp_root)
    model, params = load_ours(reference.config, "CausalLM", path)
    assert model.hf_architecture == type(reference).__name__
    apply = jax.jit(model.apply)
    ids, mask = decoder_inputs()
    assert_close(apply({"params": params}, ids, mask), torch_logits(reference, ids, mask), mask)

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path,
                                auto=transformers.AutoModelForCausalLM)
    assert_close(apply({"params": params}, ids, mask), torch_logits(loaded, ids, mask), mask)


def test_pytorch_bin_checkpoint_with_old_buffers(tmp_root, tmp_path):
    """An old-style GPT-2 pickle: the tied lm_head copy and the attn.bias mask buffers are in it, and are ignored."""
    reference, path = torch_checkpoint("gpt2", tmp_root)
    state = dict(reference.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    template = param_shapes(create(reference.config, "CausalLM")[1])
    from_bin = hf_io.load_pretrained(str(tmp_path), template, model_type="gpt2")
    from_safetensors = hf_io.load_pretrained(path, template, model_type="gpt2")
    for x, y in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(x, y)


def test_tied_and_untied_checkpoints(tmp_root):
    """An untied checkpoint does not load into a tied model (its lm_head differs from the embeddings); a tied one
    loads into an untied model, the embeddings filling lm_head."""
    _, untied_path = torch_checkpoint("mistral", tmp_root)
    tied = hf_config("mistral")
    tied.tie_word_embeddings = True
    template = param_shapes(create(tied, "CausalLM")[1])
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        hf_io.load_pretrained(untied_path, template, model_type="mistral")

    _, tied_path = torch_checkpoint("qwen2", tmp_root)
    untied = hf_config("qwen2")
    untied.tie_word_embeddings = False
    template = param_shapes(create(untied, "CausalLM")[1])
    params = hf_io.load_pretrained(tied_path, template, model_type="qwen2")
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["model"]["embed_tokens"]["embedding"].T)

"""Parity with transformers' PyTorch BART/mBART: load their checkpoints (the full model and the bare BartModel), match
their logits on padded batches, and write checkpoints they load without missing, unexpected or mismatched keys."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import bart  # noqa: E402
from tests.parity import jit, param_shapes, round_trip, seq2seq_inputs, torch_seq2seq_logits  # noqa: E402

VARIANTS = ("bart", "mbart")


def hf_config(model_type):
    """Tiny, with fewer decoder than encoder layers and different heads and FFN widths in the two stacks, so that
    a mix-up of the stacks cannot pass; mBART as its checkpoints are (scaled embeddings)."""
    return transformers.AutoConfig.for_model(
        model_type, vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=20,
        scale_embedding=model_type == "mbart", dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)


def randomize_(model):
    """Weights wider than the 0.02 init, nonzero biases, norms away from 1 and a nonzero final_logits_bias: a
    swapped or dropped param, or a wrong position row, then shows in the logits. Frozen sinusoidal tables (of the
    BART-like variants) stay as transformers computes them (Marian's are never saved)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name and not p.requires_grad:
                continue
            if "layer_norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.3 if name.endswith("weight") else 0.1)
        model.final_logits_bias.normal_(0, 1.0)
    return model


@functools.cache
def torch_checkpoint(model_type, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to)."""
    torch.manual_seed(0)
    config = hf_config(model_type)
    model = randomize_(getattr(transformers, bart.HF_ARCHITECTURES[model_type])(config)).eval()
    path = os.path.join(tmp_root, model_type)
    model.save_pretrained(path)
    return model, path


@functools.cache
def flax_model(model_type, tmp_root):
    """(our model, params loaded from the PyTorch checkpoint, jitted apply)."""
    reference, path = torch_checkpoint(model_type, tmp_root)
    model = bart.BartForConditionalGeneration(bart.BartConfig.from_hf(reference.config))
    params = hf_io.load_pretrained(path, param_shapes(model), model_type=model_type)
    return model, params, jit(model.apply)


def assert_logits_close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=1e-5)


@pytest.mark.parametrize("model_type", VARIANTS)
def test_logits_match_and_checkpoints_round_trip(model_type, tmp_root, tmp_path):
    reference, path = torch_checkpoint(model_type, tmp_root)
    model, params, apply = flax_model(model_type, tmp_root)
    assert (model.config.normalize_before, model.config.add_final_layer_norm) == (model_type == "mbart",) * 2
    assert ("layer_norm" in params["model"]["encoder"]) == (model_type == "mbart")
    np.testing.assert_array_equal(params["final_logits_bias"], reference.final_logits_bias.numpy())
    batch = seq2seq_inputs()  # pads hold pad_token_id 1; the decoder starts with 2
    expected = torch_seq2seq_logits(reference, *batch)
    assert np.abs(expected - reference.final_logits_bias.numpy()).max() > 1  # the body matters, not only the bias
    assert_logits_close(apply({"params": params}, *batch), expected)

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path)
    np.testing.assert_array_equal(loaded.final_logits_bias.numpy(), params["final_logits_bias"])
    assert_logits_close(apply({"params": params}, *batch), torch_seq2seq_logits(loaded, *batch))


def test_bare_bart_model_checkpoint_loads_with_zero_logits_bias(tmp_root, tmp_path):
    """A `BartModel` checkpoint (AutoModel: no `model.` prefix, no final_logits_bias) loads into an eval_shape'd
    template: the body as in the full checkpoint, final_logits_bias zeros (as transformers initialises it)."""
    reference, _ = torch_checkpoint("bart", tmp_root)
    model, params, _ = flax_model("bart", tmp_root)
    body = transformers.BartModel(reference.config)
    body.load_state_dict(reference.model.state_dict())
    body.save_pretrained(tmp_path)
    assert not any(k.startswith("model.") or k == "final_logits_bias"
                   for k in load_file(str(tmp_path / "model.safetensors")))
    loaded = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="bart")
    np.testing.assert_array_equal(loaded["final_logits_bias"], np.zeros((1, 99), np.float32))
    for x, y in zip(jax.tree.leaves(loaded["model"]), jax.tree.leaves(params["model"])):
        np.testing.assert_array_equal(x, y)

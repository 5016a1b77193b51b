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

from flaxtrain import hf_export, hf_io  # noqa: E402
from flaxtrain.models import bart  # noqa: E402

VARIANTS = ("bart", "mbart")
# For models this tiny, XLA's optimisation passes cost more compile time than they save at run time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})


def hf_config(model_type):
    """Tiny, with fewer decoder than encoder layers and different heads and FFN widths in the two stacks, so that
    a mix-up of the stacks cannot pass; mBART as its checkpoints are (scaled embeddings)."""
    return transformers.AutoConfig.for_model(
        model_type, vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=20,
        scale_embedding=model_type == "mbart", dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)


def randomize_(model):
    """Weights wider than the 0.02 init, nonzero biases, norms away from 1 and a nonzero final_logits_bias: a
    swapped or dropped param, or a wrong position row, then shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
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


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


def inputs(seed=0):
    """Encoder ids [3, 9] with right (row 1) and left (row 2) padding; decoder ids [3, 7] from the start token (2),
    row 1 right-padded. Pads hold pad_token_id 1."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(3, 99, (3, 9)), np.ones((3, 9), np.int64)
    mask[1, 5:], mask[2, :4] = 0, 0
    decoder_ids, decoder_mask = rng.integers(3, 99, (3, 7)), np.ones((3, 7), np.int64)
    decoder_mask[1, 4:] = 0
    decoder_ids[:, 0] = 2
    return np.where(mask == 1, ids, 1), mask, np.where(decoder_mask == 1, decoder_ids, 1), decoder_mask


def torch_logits(model, ids, mask, decoder_ids, decoder_mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(decoder_ids),
                     decoder_attention_mask=torch.tensor(decoder_mask)).logits.numpy()


def template(model):
    return jax.eval_shape(functools.partial(bart.init_params, model), jax.random.key(0))


@functools.cache
def flax_model(model_type, tmp_root):
    """(our model, params loaded from the PyTorch checkpoint, jitted apply)."""
    reference, path = torch_checkpoint(model_type, tmp_root)
    model = bart.BartForConditionalGeneration(bart.BartConfig.from_hf(reference.config))
    params = hf_io.load_pretrained(path, template(model), model_type=model_type)
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
    batch = inputs()
    expected = torch_logits(reference, *batch)
    assert np.abs(expected - reference.final_logits_bias.numpy()).max() > 1  # the body matters, not only the bias
    assert_logits_close(apply({"params": params}, *batch), expected)

    # Our save must load in PyTorch cleanly and compute what we compute; perturb the params so that the check does
    # not depend on the load path above.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), params)
    hf_export.save_pretrained(str(tmp_path), params, reference.config, architecture=model.hf_architecture)
    assert load_file(str(tmp_path / "model.safetensors")).keys() == load_file(f"{path}/model.safetensors").keys()
    loaded, info = getattr(transformers, model.hf_architecture).from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    np.testing.assert_array_equal(loaded.final_logits_bias.numpy(), params["final_logits_bias"])
    assert_logits_close(apply({"params": params}, *batch), torch_logits(loaded.eval(), *batch))


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
    loaded = hf_io.load_pretrained(str(tmp_path), template(model), model_type="bart")
    np.testing.assert_array_equal(loaded["final_logits_bias"], np.zeros((1, 99), np.float32))
    for x, y in zip(jax.tree.leaves(loaded["model"]), jax.tree.leaves(params["model"])):
        np.testing.assert_array_equal(x, y)

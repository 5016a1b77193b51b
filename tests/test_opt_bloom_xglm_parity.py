"""Parity with transformers' PyTorch OPT, BLOOM and XGLM: load their checkpoints, match their logits on left- and
right-padded batches (both OPT layouts, ALiBi with head counts that are not powers of two, XGLM's sinusoids with
the pad row quirk), write checkpoints they load cleanly, generate what their greedy `generate` does, and have their
full-size parameter counts."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import generate, hf_io  # noqa: E402
from flaxtrain.models import alibi, bloom, create, opt, xglm  # noqa: E402
from tests.parity import (assert_close, decoder_inputs, jit, load_ours, param_count, param_shapes,  # noqa: E402
                          round_trip, torch_logits, torch_param_count)

COMMON = dict(vocab_size=99, pad_token_id=1, bos_token_id=0, eos_token_id=2)
OPT = dict(COMMON, hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
           init_std=0.2, dropout=0.1)
CONFIGS = {
    "opt": ("opt", OPT),  # pre-norm, final norm, tied head (opt-125m, opt-1.3b, ...)
    # opt-350m's layout: post-norm, no final norm, embeddings in a narrower width with project_in/out.
    "opt-350m": ("opt", dict(OPT, do_layer_norm_before=False, word_embed_proj_dim=16, activation_function="gelu")),
    "opt-bare": ("opt", dict(OPT, enable_bias=False, layer_norm_elementwise_affine=False, tie_word_embeddings=False)),
    # 6 heads: 4 slopes of the power-of-two sequence, 2 from the one of 8 heads.
    "bloom": ("bloom", dict(COMMON, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.2)),
    "bloom-post": ("bloom", dict(COMMON, hidden_size=36, n_layer=2, n_head=3, initializer_range=0.2,
                                 apply_residual_connection_post_layernorm=True, tie_word_embeddings=False)),
    "xglm": ("xglm", dict(COMMON, d_model=32, ffn_dim=37, num_layers=2, attention_heads=4, init_std=0.2,
                          max_position_embeddings=32)),
    # An odd width (a zero column), unscaled embeddings, untied head, and pad id 4: transformers zeroes row 4 of
    # the sinusoid table, which is position 2, a real token's.
    "xglm-odd": ("xglm", dict(COMMON, d_model=33, ffn_dim=37, num_layers=2, attention_heads=3, init_std=0.2,
                              max_position_embeddings=32, scale_embedding=False, tie_word_embeddings=False,
                              pad_token_id=4)),
}


def hf_config(name):
    model_type, settings = CONFIGS[name]
    return transformers.AutoConfig.for_model(model_type, **settings)


def randomize_(model):
    """Norms away from 1 and biases away from 0, so that a swapped or dropped one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@functools.cache
def torch_checkpoint(name, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to)."""
    torch.manual_seed(0)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(hf_config(name))).eval()
    path = os.path.join(tmp_root, name)
    model.save_pretrained(path)
    return model, path


@functools.cache
def flax_model(name, tmp_root):
    """(our model, params loaded from the PyTorch checkpoint, jitted apply)."""
    reference, path = torch_checkpoint(name, tmp_root)
    model, params = load_ours(reference.config, "CausalLM", path)
    return model, params, jit(model.apply)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_and_checkpoints_round_trip(name, tmp_root, tmp_path):
    reference, path = torch_checkpoint(name, tmp_root)
    model, params, apply = flax_model(name, tmp_root)
    assert model.hf_architecture == type(reference).__name__
    ids, mask = decoder_inputs(pad_id=1, low=5)
    expected = torch_logits(reference, ids, mask)
    assert np.abs(expected).max() > 1  # large enough for atol to mean something
    assert_close(apply({"params": params}, ids, mask), expected, mask)

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path,
                                auto=transformers.AutoModelForCausalLM)
    assert_close(apply({"params": params}, ids, mask), torch_logits(loaded, ids, mask), mask)


@pytest.mark.parametrize("name", ["opt", "bloom", "xglm"])
def test_bare_model_checkpoint_loads(name, tmp_root, tmp_path):
    """A checkpoint of the bare body (AutoModel: OPTModel's keys start at `decoder.`, BloomModel's at `h.`...) loads
    as the full one does (the tied head needs nothing more)."""
    reference, _ = torch_checkpoint(name, tmp_root)
    model, params, _ = flax_model(name, tmp_root)
    body = transformers.AutoModel.from_config(reference.config)
    body.load_state_dict(reference.base_model.state_dict())
    body.save_pretrained(tmp_path)
    loaded = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type=reference.config.model_type)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)


def prompts():
    """[3, 6] left-padded prompts of 6, 4 and 1 tokens (pads hold 1)."""
    ids = np.random.default_rng(2).integers(5, 99, (3, 6))
    mask = np.ones_like(ids)
    mask[1, :2], mask[2, :5] = 0, 0
    return np.where(mask == 1, ids, 1), mask


@pytest.mark.parametrize("name", ["opt-350m", "bloom", "xglm"])
def test_greedy_generation_equals_transformers(name, tmp_root):
    """Left-padded prompts through the key/value cache: OPT's positions and BLOOM's ALiBi counted over the cache's
    real slots, XGLM's positions as generate passes them."""
    reference, _ = torch_checkpoint(name, tmp_root)
    model, params, _ = flax_model(name, tmp_root)
    ids, mask = prompts()
    ours = np.asarray(generate.generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=2, pad_token_id=1))
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=8, eos_token_id=2, pad_token_id=1).numpy()
    theirs = np.pad(out[:, ids.shape[1]:], ((0, 0), (0, 8 - (out.shape[1] - ids.shape[1]))), constant_values=1)
    np.testing.assert_array_equal(ours, theirs)


def test_alibi_slopes_and_xglm_positions_equal_transformers():
    """ALiBi slopes for every head count up to 160 (powers of two and not) as transformers' BLOOM (to one float32
    ulp: torch's float32 pow is not always correctly rounded), the bias from a padded mask as its; XGLM's sinusoids
    at positions up to 2048 as transformers' table, the pad row included (to 1e-6 at the first 64 positions; to
    2.5e-4 beyond: a frequency one float32 ulp apart moves the angle of position 2048 by up to ~1.2e-4)."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
    from transformers.models.xglm.modeling_xglm import XGLMSinusoidalPositionalEmbedding

    for heads in range(1, 161):
        np.testing.assert_allclose(alibi.alibi_slopes(heads), _get_alibi_slopes(heads, "cpu").numpy(), rtol=1.2e-7,
                                   atol=0, err_msg=f"{heads} heads")
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    bias = np.asarray(alibi.alibi_bias(mask, 5))  # [B, N, 1, S]
    np.testing.assert_array_equal(bias[:, :, 0], build_alibi_tensor(torch.tensor(mask), 5, torch.float32)
                                  .reshape(2, 5, 5).numpy())

    for dim in (64, 1024):
        table = XGLMSinusoidalPositionalEmbedding.get_embedding(2050, dim, padding_idx=1).numpy()
        ours = np.asarray(xglm.sinusoidal_positions(np.arange(-1, 2048)[None], dim, 1, np.float32)[0])
        np.testing.assert_allclose(ours[:64], table[1:65], atol=1e-6)
        # Far positions: torch's float32 exp is a ulp off for a few frequencies, which moves their angles (below).
        np.testing.assert_allclose(ours, table[1:], atol=2.5e-4)


@pytest.mark.parametrize("name", ["opt-350m", "bloom-post", "xglm"])
def test_every_param_has_one_logical_name_per_dimension(name):
    """The logical axis names that parallel.shardings maps onto the mesh (models/partitioning.py)."""
    import flax.linen as nn

    from flaxtrain import parallel

    config = hf_config(name)
    family, model = create(config, "CausalLM")
    boxed = jax.eval_shape(functools.partial(family.init_params, model, unbox=False), jax.random.key(0, impl="rbg"))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    scanned = family.hf.scanned[0].replace(".", "/") + "/"
    for path, leaf in leaves:
        path = "/".join(k.key for k in path)
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= set(parallel.RULES), (path, leaf.names)
        assert (leaf.names[0] == "layers") == path.startswith(scanned), (path, leaf.names)


FULL_SIZE = {  # the real configs' values (no network)
    "opt-1.3b": ("opt", dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32,
                             vocab_size=50272, max_position_embeddings=2048), 1_315_758_080),
    "opt-350m": ("opt", dict(hidden_size=1024, ffn_dim=4096, num_hidden_layers=24, num_attention_heads=16,
                             vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=False,
                             word_embed_proj_dim=512), 331_196_416),
    "bloom-560m": ("bloom", dict(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880), 559_214_592),
    "xglm-564M": ("xglm", dict(d_model=1024, ffn_dim=4096, num_layers=24, attention_heads=16, vocab_size=256008,
                               max_position_embeddings=2048), 564_463_616),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_param_counts_equal_pytorch(name):
    model_type, settings, count = FULL_SIZE[name]
    config = transformers.AutoConfig.for_model(model_type, **settings)
    _, model = create(config, "CausalLM")
    assert param_count(model) == torch_param_count(transformers.AutoModelForCausalLM, config) == count


def test_unsupported_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="layerdrop=0.1"):
        opt.OPTConfig.from_hf(transformers.OPTConfig(layerdrop=0.1))
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        xglm.XGLMConfig.from_hf(transformers.XGLMConfig(add_cross_attention=True))
    assert not opt.OPTConfig.from_hf(transformers.OPTConfig(_remove_final_layer_norm=True)).final_layer_norm
    assert bloom.BloomConfig.from_hf(transformers.BloomConfig()).seq_length == bloom.TRAINING_LENGTH

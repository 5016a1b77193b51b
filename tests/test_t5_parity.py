"""Parity with transformers' PyTorch T5/mT5: load their checkpoints, match their logits, write checkpoints they load
without missing, unexpected or mismatched keys, and generate their greedy tokens with our KV cache."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers.cache_utils import DynamicCache, EncoderDecoderCache  # noqa: E402

from flaxtrain import generate_seq2seq, hf_io  # noqa: E402
from flaxtrain.models import t5  # noqa: E402
from tests.parity import param_shapes, round_trip, seq2seq_inputs, torch_seq2seq_logits  # noqa: E402

# (model_type, feed_forward_proj, tie_word_embeddings): v1.0, v1.1, mT5.
VARIANTS = {"v1.0": ("t5", "relu", True), "v1.1": ("t5", "gated-gelu", False), "mt5": ("mt5", "gated-gelu", False)}


def hf_config(variant):
    model_type, proj, tie = VARIANTS[variant]
    # Fewer decoder than encoder layers, so that a mix-up of the two scanned stacks cannot pass; few buckets and a
    # short max_distance, so that the log-spaced buckets are exercised at these lengths.
    return transformers.AutoConfig.for_model(
        model_type, vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, feed_forward_proj=proj,
        tie_word_embeddings=tie, dropout_rate=0.1)


@functools.cache
def torch_checkpoint(variant, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to). The norms are drawn away from 1, so that a
    swapped norm shows."""
    config = hf_config(variant)
    torch.manual_seed(0)
    model = getattr(transformers, t5._HF_ARCHITECTURES[config.model_type])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
        if not VARIANTS[variant][2]:  # transformers 5 ties lm_head at init even for v1.1/mT5; trained ones are not
            model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    path = os.path.join(tmp_root, variant)
    model.save_pretrained(path)
    return model, path


def inputs(seed=0):
    """Encoder ids with right padding (row 1) and left padding (row 2, T5 has no absolute positions); decoder ids
    starting with the start token (0), row 1 right-padded. Pads hold pad_token_id 0."""
    return seq2seq_inputs(low=2, start_id=0, pad_id=0, seed=seed)


@functools.cache
def flax_model(variant, tmp_root):
    """(our model, params loaded from the PyTorch checkpoint, jitted apply)."""
    reference, path = torch_checkpoint(variant, tmp_root)
    model = t5.T5ForConditionalGeneration(t5.T5Config.from_hf(reference.config))
    params = hf_io.load_pretrained(path, param_shapes(model), model_type=reference.config.model_type)
    return model, params, jax.jit(model.apply)


def assert_logits_close(ours, theirs):
    # T5's init gives logits of order 10 (v1.0) to 30 (v1.1's N(0, 1) lm_head): atol is relative to that scale. (In
    # float64, with transformers' float32 norm statistics patched out, the two agree to 1e-12.)
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_and_checkpoints_round_trip(variant, tmp_root, tmp_path):
    reference, path = torch_checkpoint(variant, tmp_root)
    model, params, apply = flax_model(variant, tmp_root)
    assert model.config.tie_word_embeddings == VARIANTS[variant][2]
    assert ("lm_head" in params) != model.config.tie_word_embeddings
    batch = inputs()
    assert_logits_close(apply({"params": params}, *batch), torch_seq2seq_logits(reference, *batch))

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path)
    assert_logits_close(apply({"params": params}, *batch), torch_seq2seq_logits(loaded, *batch))


@pytest.mark.parametrize("variant", ["v1.0", "mt5"])  # v1.1 runs mT5's code with the same weights
def test_greedy_generation_matches_transformers(variant, tmp_root):
    reference, _ = torch_checkpoint(variant, tmp_root)
    model, params, _ = flax_model(variant, tmp_root)
    ids, mask, _, _ = inputs(seed=2)
    free = np.asarray(generate_seq2seq.greedy_search(model, params, ids, mask, max_new_tokens=10, eos_token_id=()))
    # As end-of-sequence, the token that appears last for the first time in a row: that row must stop there and be
    # padded after it. (The tied v1.0 head soon repeats one token; mT5's rows vary.)
    row, pos = max(((r, p) for r in range(3) for p in range(10) if free[r, p] not in free[r, :p]),
                   key=lambda rp: (rp[1], -rp[0]))
    eos = int(free[row, pos])
    tokens = np.asarray(generate_seq2seq.greedy_search(model, params, ids, mask, max_new_tokens=10, eos_token_id=eos))
    with torch.no_grad():
        # An explicit cache: transformers sizes its default one by the encoder's layer count.
        expected = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
            max_new_tokens=10, decoder_start_token_id=0, eos_token_id=eos, pad_token_id=0,
            past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache())).numpy()
    assert (expected[:, 0] == 0).all()  # transformers' output starts with the decoder start token; ours does not
    expected = np.pad(expected[:, 1:], ((0, 0), (0, 10 + 1 - expected.shape[1])))  # it stops when all rows have
    np.testing.assert_array_equal(tokens, expected)
    assert tokens[row, pos] == eos and (tokens[row, pos + 1:] == 0).all()
    assert variant == "v1.0" or pos >= 3


def test_cached_decoding_equals_uncached(tmp_root):
    """Teacher-forced: the decoder fed through the cache one token, then two, then one at a time computes the
    logits of the uncached causal pass."""
    model, params, apply = flax_model("v1.0", tmp_root)
    ids, mask, decoder_ids, _ = inputs()
    expected = apply({"params": params}, ids, mask, decoder_ids)
    encoder_hidden = model.apply({"params": params}, ids, mask, method=model.encode)
    decode = jax.jit(functools.partial(model.apply, method=model.decode))
    cache = model.init_cache(ids.shape[0], decoder_ids.shape[1])
    pieces, hidden = [], encoder_hidden
    for start, stop in [(0, 1), (1, 3), *((t, t + 1) for t in range(3, 7))]:
        logits, cache = decode({"params": params}, decoder_ids[:, start:stop], hidden, mask, cache=cache)
        pieces.append(logits)
        hidden = None  # the cross-attention keys/values now come from the cache
    assert int(cache["index"]) == 7 and cache["cross"]["key"].shape == (2, 3, 9, 4, 8)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), expected, atol=1e-5 * np.abs(expected).max())


def test_checkpoint_saved_tied_loads_into_untied_head(tmp_root, tmp_path):
    """transformers 5 ties a fresh mT5's (and T5 v1.1's) lm_head to `shared` and saves no lm_head.weight; our
    untied model copies it from `shared` and computes what the PyTorch model does."""
    torch.manual_seed(1)
    reference = transformers.MT5ForConditionalGeneration(hf_config("mt5")).eval()
    reference.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    model, template, apply = flax_model("mt5", tmp_root)  # same config, so the compiled apply is reused
    params = hf_io.load_pretrained(str(tmp_path), template, model_type="mt5")
    np.testing.assert_array_equal(params["lm_head"]["kernel"], params["shared"]["embedding"].T)
    batch = inputs()
    assert_logits_close(apply({"params": params}, *batch), torch_seq2seq_logits(reference, *batch))

"""BART/mBART model code and its checkpoint-key rules: cached decoding, greedy generation against transformers,
remat, bf16, dropout, config checks, full-size param counts."""

import dataclasses
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402
from flax import traverse_util  # noqa: E402

from flaxtrain import generate_seq2seq, hf_io, models  # noqa: E402
from flaxtrain.models import bart, get_family, layers  # noqa: E402

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU (see test_bert.py).
key = functools.partial(jax.random.key, impl="rbg")
# For models this tiny, XLA's optimisation passes cost more compile time than they save at run time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})
TINY = dict(vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=20,
            dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)


def batch(seed=0):
    """Encoder ids [3, 9] with right (row 1) and left (row 2) padding; decoder ids [3, 7], row 1 right-padded."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(3, 99, (3, 9)), np.ones((3, 9), np.int32)
    mask[1, 5:], mask[2, :4] = 0, 0
    decoder_ids, decoder_mask = rng.integers(3, 99, (3, 7)), np.ones((3, 7), np.int32)
    decoder_mask[1, 4:] = 0
    decoder_ids[:, 0] = 2
    return np.where(mask == 1, ids, 1), mask, np.where(decoder_mask == 1, decoder_ids, 1), decoder_mask


def random_params(model, seed=0):
    """Params of `model` drawn on the host (no init to compile): N(0, 0.3) weights and biases, norm scales near 1,
    a nonzero final_logits_bias."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(bart.init_params, model), key(0))
    return traverse_util.unflatten_dict({
        path: (1 + rng.normal(0, 0.2, s.shape) if path[-1] == "scale" else rng.normal(0, 0.3, s.shape)).astype(s.dtype)
        for path, s in traverse_util.flatten_dict(shapes).items()})


@functools.cache
def tiny():
    """(mBART-style model: pre-norm, final norms, scaled embeddings; params; jitted apply), shared: each
    compilation costs seconds on a small CPU."""
    model = bart.BartForConditionalGeneration(bart.BartConfig(**TINY, model_type="mbart", scale_embedding=True))
    return model, random_params(model), jit(model.apply, static_argnames="deterministic")


def test_cached_decoding_equals_uncached():
    """Teacher-forced: the decoder fed through the cache two tokens, then one at a time, computes the logits of the
    uncached causal pass (positions continue at the cache index)."""
    model, params, apply = tiny()
    ids, mask, decoder_ids, _ = batch()
    expected = apply({"params": params}, ids, mask, decoder_ids)
    encoder_hidden = jit(functools.partial(model.apply, method=model.encode))({"params": params}, ids, mask)
    decode = jit(functools.partial(model.apply, method=model.decode))
    cache = model.init_cache(ids.shape[0], decoder_ids.shape[1])
    pieces, hidden = [], encoder_hidden
    for start, stop in [(0, 2), *((t, t + 1) for t in range(2, 7))]:
        logits, cache = decode({"params": params}, decoder_ids[:, start:stop], hidden, mask, cache=cache)
        pieces.append(logits)
        hidden = None  # the cross-attention keys/values now come from the cache
    assert int(cache["index"]) == 7 and cache["cross"]["key"].shape == (2, 3, 9, 2, 16)
    assert cache["self"]["key"].shape == (2, 3, 7, 2, 16)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), expected, atol=1e-5 * np.abs(expected).max())


def test_greedy_search_matches_transformers_generate(tmp_path):
    """Our greedy search on a tiny PyTorch BART's weights gives transformers' greedy tokens: without forced tokens
    and an end-of-sequence token that one row reaches early; then with the config's forced BOS (from a generation
    config, as transformers 5 keeps it) and forced EOS (BART's config default) through `generate`."""
    torch = pytest.importorskip("torch")
    from tests.test_parity import bart_weights

    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model("bart", **TINY)
    reference = bart_weights(transformers.BartForConditionalGeneration(hf_config)).eval()
    reference.save_pretrained(tmp_path)
    config = bart.BartConfig.from_hf(hf_config, transformers.GenerationConfig(forced_bos_token_id=0))
    assert (config.decoder_start_token_id, config.pad_token_id, config.forced_bos_token_id,
            config.forced_eos_token_id) == (2, 1, 0, 2)
    model = bart.BartForConditionalGeneration(config)
    shapes = jax.eval_shape(functools.partial(bart.init_params, model), key(0))
    params = hf_io.load_pretrained(str(tmp_path), shapes, model_type="bart")
    ids, mask, _, _ = batch(seed=2)
    steps = 8

    def expected(eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None):
        with torch.no_grad():
            tokens = reference.generate(
                input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
                max_length=steps + 1, decoder_start_token_id=2, eos_token_id=eos_token_id, pad_token_id=1,
                forced_bos_token_id=forced_bos_token_id, forced_eos_token_id=forced_eos_token_id).numpy()
        assert (tokens[:, 0] == 2).all()  # transformers' output starts with the decoder start token; ours does not
        return np.pad(tokens[:, 1:], ((0, 0), (0, steps + 1 - tokens.shape[1])), constant_values=1)

    # As end-of-sequence, a token that first appears late in some row: that row must stop there, padded after.
    free = expected(eos_token_id=99)  # out of the vocabulary: never generated
    row, pos = max(((r, p) for r in range(3) for p in range(steps) if free[r, p] not in free[r, :p]),
                   key=lambda rp: (rp[1], -rp[0]))
    eos = int(free[row, pos])
    tokens = np.asarray(generate_seq2seq.greedy_search(model, params, ids, mask, max_new_tokens=steps,
                                                       eos_token_id=eos))
    np.testing.assert_array_equal(tokens, expected(eos))
    assert pos >= 2 and tokens[row, pos] == eos and (tokens[row, pos + 1:] == 1).all()

    forced = dict(forced_bos_token_id=config.forced_bos_token_id, forced_eos_token_id=config.forced_eos_token_id)
    # The same eos, so nothing recompiles (the forced ids are data). Forced BOS changes every row; forced EOS acts on
    # rows that reach the last position (generate_seq2seq's own tests check it).
    tokens = np.asarray(generate_seq2seq.generate(model, params, ids, mask, max_new_tokens=steps, num_beams=1,
                                                  eos_token_id=eos, **forced))
    np.testing.assert_array_equal(tokens, expected(eos, **forced))
    assert (tokens[:, 0] == 0).all() and not np.array_equal(tokens[:, 1:], free[:, 1:])


def test_gradient_checkpointing_bfloat16_and_dropout():
    """The remat'd model (under scan) in bf16 computation gives float32 logits close to the plain float32 model's;
    dropout follows the "dropout" rng and changes the outputs. (Gradients through remat are not compared here: a
    backward pass costs ~10 s of compilation on a small CPU; one compile for remat and bf16 together.)"""
    model, params, apply = tiny()
    inputs = batch()
    expected = apply({"params": params}, *inputs)
    remat_bf16 = bart.BartForConditionalGeneration(model.config, dtype=jnp.bfloat16, gradient_checkpointing=True)
    logits = jit(remat_bf16.apply)({"params": params}, *inputs)
    assert logits.dtype == jnp.float32
    assert 0 < float(jnp.abs(logits - expected).max()) < 0.05 * float(jnp.abs(expected).max())

    train = [apply({"params": params}, *inputs, deterministic=False, rngs={"dropout": key(i)}) for i in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2]) and not np.allclose(train[0], expected)


def test_checkpoint_rules_without_torch():
    """Keys and layouts: the layers split per stack, final_logits_bias [1, V]; an old checkpoint's tied copies and
    version buffers are dropped; a bare BartModel state (no prefix, no final_logits_bias) loads with zero bias."""
    model, params, _ = tiny()
    state = hf_io.params_to_state_dict(params, scanned=bart.FAMILY.hf.scanned)
    assert state["final_logits_bias"].shape == (1, 99)
    assert state["model.encoder.embed_positions.weight"].shape == (22, 32)  # offset 2
    np.testing.assert_array_equal(state["model.decoder.layers.1.encoder_attn.k_proj.weight"],
                                  params["model"]["decoder"]["layers"]["encoder_attn"]["k_proj"]["kernel"][1].T)
    assert {k.split(".")[3] for k in state if ".layers." in k and k.startswith("model.encoder")} == {"0", "1", "2"}
    # Per encoder layer: q/k/v/out (weight, bias) 8, fc1/fc2 4, two norms 4; per decoder layer 10 more (cross
    # attention and its norm); shared, 2 x (positions, layernorm_embedding 2, final layer_norm 2), final_logits_bias.
    assert len(state) == 3 * 16 + 2 * 26 + 1 + 2 * 5 + 1
    hf = bart.FAMILY.hf
    rules = dict(scanned=hf.scanned, tied=hf.tied, drop=hf.ignored, zeros=hf.zeros)
    old = dict(state, **{"lm_head.weight": state["model.shared.weight"],
                         "model.encoder.embed_tokens.weight": state["model.shared.weight"],
                         "model.encoder.version": np.array([2.0])})
    loaded = traverse_util.flatten_dict(hf_io.state_dict_to_params(old, params, **rules))
    for path, value in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(loaded[path], value, err_msg="/".join(path))

    body = {k.removeprefix("model."): v for k, v in state.items() if k != "final_logits_bias"}
    loaded = hf_io.state_dict_to_params(body, params, base_model_prefix="model", **rules)
    assert not np.any(loaded["final_logits_bias"])
    np.testing.assert_array_equal(loaded["model"]["shared"]["embedding"], params["model"]["shared"]["embedding"])
    with pytest.raises(ValueError, match="missing key.*final_logits_bias"):
        hf_io.state_dict_to_params(body, params, base_model_prefix="model", scanned=hf.scanned)


def test_config_from_hf_switches_and_refusals():
    mbart = bart.BartConfig.from_hf(transformers.AutoConfig.for_model("mbart", scale_embedding=True))
    assert (mbart.normalize_before, mbart.add_final_layer_norm, mbart.scale_embedding) == (True, True, True)
    assert mbart.decoder_start_token_id == mbart.bos_token_id == 0  # None in MBartConfig: generate uses bos
    assert (mbart.forced_bos_token_id, mbart.forced_eos_token_id, mbart.eos_token_id) == (None, 2, 2)
    base = bart.BartConfig.from_hf(transformers.AutoConfig.for_model("bart", decoder_start_token_id=3))
    assert (base.normalize_before, base.decoder_start_token_id, base.forced_bos_token_id) == (False, 3, None)
    # transformers 5 keeps forced_bos_token_id only in the generation config (generation_config.json).
    generation = transformers.GenerationConfig(forced_bos_token_id=0, decoder_start_token_id=7)
    overridden = bart.BartConfig.from_hf(transformers.AutoConfig.for_model("bart"), generation)
    assert (overridden.forced_bos_token_id, overridden.decoder_start_token_id, overridden.eos_token_id) == (0, 7, 2)
    assert bart.max_positions(base) == 1024

    bad = dict(encoder_layerdrop=0.1, tie_word_embeddings=False, normalize_before=True, add_bias_logits=True)
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"unsupported settings: {name}"):
            bart.BartConfig.from_hf(transformers.AutoConfig.for_model("bart", **{name: value}))
    with pytest.raises(ValueError, match="activation_function 'bogus'"):
        dataclasses.replace(base, activation_function="bogus")

    family, model = models.create(transformers.AutoConfig.for_model("mbart"), "Seq2SeqLM", dtype=jnp.bfloat16)
    assert family is bart.FAMILY and get_family("bart") is bart.FAMILY and model.dtype == jnp.bfloat16
    assert model.hf_architecture == "MBartForConditionalGeneration"
    assert bart.BartForConditionalGeneration(base).hf_architecture == "BartForConditionalGeneration"


def test_shift_tokens_right_cache_layout_length_limit_and_pad_row():
    labels = np.array([[5, 6, 2], [7, -100, -100]])
    np.testing.assert_array_equal(bart.shift_tokens_right(labels, 1, 2), [[2, 5, 6], [2, 7, 1]])
    shifted = bart.shift_tokens_right(jnp.asarray(labels), 1, 2)
    assert isinstance(shifted, jax.Array) and shifted.tolist() == [[2, 5, 6], [2, 7, 1]]
    model = bart.BartForConditionalGeneration(bart.BartConfig(**TINY), dtype=jnp.bfloat16)
    cache = model.init_cache(3, 5)
    assert cache["self"]["key"].shape == (2, 3, 5, 2, 16) and cache["self"]["value"].dtype == jnp.bfloat16
    assert int(cache["index"]) == 0 and cache["cross"] == {}
    with pytest.raises(ValueError, match="21 tokens is longer than the 20 learned positions"):
        model.init_cache(1, 21)
    embedding = layers.token_embedding_init(0.02, 1)(key(0), (5, 4))  # transformers zeros the pad row at init
    assert not np.any(embedding[1]) and np.all(np.delete(embedding, 1, axis=0) != 0)


def test_full_size_param_counts_equal_pytorch():
    """bart-base and mbart-large sizes, shapes only: our counts (less the final_logits_bias buffer) equal the
    transformers PyTorch models'."""
    torch = pytest.importorskip("torch")
    base = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    for model_type, settings, count in [("bart", base, 139_420_416),
                                        ("mbart", dict(vocab_size=250027), 610_851_840)]:
        hf_config = transformers.AutoConfig.for_model(model_type, **settings)
        with torch.device("meta"):  # allocates nothing
            reference = getattr(transformers, bart.HF_ARCHITECTURES[model_type])(hf_config)
        expected = sum(p.numel() for p in reference.parameters())  # tied weights are counted once
        model = bart.BartForConditionalGeneration(bart.BartConfig.from_hf(hf_config))
        shapes = jax.eval_shape(functools.partial(bart.init_params, model), key(0))
        ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) - hf_config.vocab_size
        assert ours == expected == count

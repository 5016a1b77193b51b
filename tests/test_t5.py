"""T5 model code and its checkpoint-key rules: shapes, position buckets, full-size param counts, remat, bf16,
padding."""

import dataclasses
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import get_family, t5  # noqa: E402

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU (see test_bert.py).
key = functools.partial(jax.random.key, impl="rbg")
TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=12)
VARIANTS = {"v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def batch(seed=0):
    """Encoder ids [3, 9] with right (row 1) and left (row 2) padding; decoder ids [3, 6], row 1 right-padded."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(2, 99, (3, 9)), np.ones((3, 9), np.int32)
    mask[1, 5:], mask[2, :4] = 0, 0
    decoder_ids, decoder_mask = rng.integers(2, 99, (3, 6)), np.ones((3, 6), np.int32)
    decoder_mask[1, 3:] = 0
    return ids * mask, mask, decoder_ids * decoder_mask, decoder_mask


@functools.cache
def tiny(variant):
    """(model, params, jitted apply), shared: each compilation costs seconds on a small CPU."""
    model = t5.T5ForConditionalGeneration(t5.T5Config(**TINY, **VARIANTS[variant]))
    return model, t5.init_params(model, key(0)), jax.jit(model.apply, static_argnames="deterministic")


def shapes(model):
    return jax.eval_shape(functools.partial(t5.init_params, model), jax.random.key(0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_tree_and_shapes(variant):
    model = t5.T5ForConditionalGeneration(t5.T5Config(**TINY, **VARIANTS[variant]))
    params = shapes(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    encoder, decoder = params["encoder"], params["decoder"]
    assert encoder["block"]["layer"]["0"]["SelfAttention"]["q"]["kernel"].shape == (3, 32, 32)
    assert decoder["block"]["layer"]["1"]["EncDecAttention"]["k"]["kernel"].shape == (2, 32, 32)
    assert encoder["relative_attention_bias"]["embedding"].shape == (8, 4)  # one per stack, outside the scan
    ffn = set(decoder["block"]["layer"]["2"]["DenseReluDense"])
    assert ffn == ({"wi_0", "wi_1", "wo"} if variant == "v1.1" else {"wi", "wo"})
    assert ("lm_head" in params) == (variant == "v1.1") and set(encoder["block"]["layer"]) == {"0", "1"}

    ids, mask, decoder_ids, decoder_mask = batch()
    logits = jax.eval_shape(model.apply, {"params": params}, ids, mask, decoder_ids, decoder_mask)
    assert logits.shape == (3, 6, 99) and logits.dtype == jnp.float32
    hidden = jax.eval_shape(functools.partial(model.apply, method=model.encode), {"params": params}, ids, mask)
    assert hidden.shape == (3, 9, 32)


def test_relative_position_buckets_match_transformers():
    """Both directions, default and tiny settings, distances far past max_distance; (128, 100) is a setting where
    an on-device float32 log truncates to the bucket below (see `_bucket_table`)."""
    pytest.importorskip("torch")
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-700, 700)[None, :] + np.arange(0, 300, 7)[:, None]  # [Q, K] grid
    for num_buckets, max_distance in [(32, 128), (8, 12), (6, 100), (128, 100), (64, 256)]:
        for bidirectional in (True, False):
            expected = T5Attention._relative_position_bucket(torch.tensor(relative), bidirectional=bidirectional,
                                                             num_buckets=num_buckets, max_distance=max_distance)
            got = t5.relative_position_bucket(jnp.asarray(relative), bidirectional, num_buckets, max_distance)
            np.testing.assert_array_equal(got, expected.numpy(), err_msg=f"{num_buckets} {max_distance}")


def test_checkpoint_keys_and_tied_head_rules():
    """Torch-free hf_io: the shared position bias goes to block 0; v1.1's lm_head is loaded, or copied from
    `shared` when saved tied (as transformers 5 saves a fresh v1.1); old unused keys are dropped; a v1.1 head
    cannot load into a tied v1.0 model."""
    rng = np.random.default_rng(0)
    rules = dict(scanned=t5.FAMILY.hf.scanned, renamed=t5.FAMILY.hf.renamed)
    load_rules = dict(rules, tied=t5.FAMILY.hf.tied, drop=t5.FAMILY.hf.ignored)
    template = shapes(tiny("v1.1")[0])
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), template)
    state = hf_io.params_to_state_dict(params, **rules)
    bias_keys = sorted(k for k in state if "relative_attention_bias" in k)
    assert bias_keys == [f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                         for s in ("decoder", "encoder")]
    np.testing.assert_array_equal(state["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"],
                                  params["decoder"]["block"]["layer"]["2"]["DenseReluDense"]["wi_1"]["kernel"][1].T)
    assert len(state) == 2 + 2 + 2 + 3 * 9 + 2 * 14  # shared, lm_head, final norms, biases, 9 per encoder block...

    old = dict(state, **{"encoder.embed_tokens.weight": state["shared.weight"],
                         "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight": np.zeros((8, 4))})
    loaded = hf_io.state_dict_to_params(old, template, **load_rules)
    for path, value in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(traverse_util.flatten_dict(loaded)[path], value, err_msg="/".join(path))

    tied_save = {k: v for k, v in state.items() if k != "lm_head.weight"}
    loaded = hf_io.state_dict_to_params(tied_save, template, **load_rules)
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["shared"]["embedding"].T)

    v10_template = shapes(t5.T5ForConditionalGeneration(t5.T5Config(**TINY, feed_forward_proj="gated-gelu")))
    with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight"):
        hf_io.state_dict_to_params(state, v10_template, **load_rules)


def test_padding_is_invisible():
    """Whatever sits under either attention mask cannot change the logits of the real decoder tokens."""
    model, params, apply = tiny("v1.1")
    ids, mask, decoder_ids, decoder_mask = batch()
    expected = apply({"params": params}, ids, mask, decoder_ids, decoder_mask)
    other_ids = np.where(mask == 0, (ids + 7) % 99, ids)
    other_decoder_ids = np.where(decoder_mask == 0, (decoder_ids + 5) % 99, decoder_ids)
    got = apply({"params": params}, other_ids, mask, other_decoder_ids, decoder_mask)
    real = decoder_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=1e-5)


def test_dropout_rngs_and_gradient_checkpointing():
    """Dropout follows the "dropout" rng; remat (under scan) changes neither logits nor gradients. (Without dropout
    in the gradient check: random bits under scan and remat double its compile time, and remat's recomputation does
    not depend on them.)"""
    model, params, apply = tiny("v1.0")
    inputs = batch()
    train = [apply({"params": params}, *inputs, deterministic=False, rngs={"dropout": key(i)}) for i in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2]) and not np.allclose(train[0], apply({"params": params}, *inputs))

    def step(module):
        def loss(p):
            logits = module.apply({"params": p}, *inputs)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, logits), grads = step(model)(params)
    (_, remat_logits), remat_grads = step(t5.T5ForConditionalGeneration(model.config, gradient_checkpointing=True))(
        params)
    np.testing.assert_allclose(remat_logits, logits, atol=1e-5)
    for x, y in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_computation(variant):
    model, params, apply = tiny(variant)
    inputs = batch()
    expected = apply({"params": params}, *inputs)
    logits = jax.jit(t5.T5ForConditionalGeneration(model.config, dtype=jnp.bfloat16).apply)({"params": params},
                                                                                            *inputs)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - expected).max()) < 0.05 * float(jnp.abs(expected).max())


def test_full_size_param_counts_equal_pytorch():
    """t5-small and a t5-v1_1-base sized model, shapes only: the counts equal the transformers PyTorch models'."""
    torch = pytest.importorskip("torch")
    import transformers

    v11_base = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_model=768, d_ff=2048,
                    num_layers=12, num_heads=12)
    for settings, count in [({}, 60_506_624), (v11_base, 247_577_856)]:
        hf_config = transformers.AutoConfig.for_model("t5", **settings)
        config = t5.T5Config.from_hf(hf_config)
        with torch.device("meta"):  # allocates nothing
            reference = transformers.T5ForConditionalGeneration(hf_config)
            if not config.tie_word_embeddings:  # transformers 5 ties it at init; a v1.1 checkpoint unties it
                reference.lm_head.weight = torch.nn.Parameter(torch.empty(config.vocab_size, config.d_model))
        expected = sum(p.numel() for p in reference.parameters())  # tied weights are counted once
        params = shapes(t5.T5ForConditionalGeneration(config))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == expected == count


def test_config_from_hf_and_registry():
    import transformers

    v11 = t5.T5Config.from_hf(transformers.AutoConfig.for_model("t5", feed_forward_proj="gated-gelu",
                                                                tie_word_embeddings=False, num_decoder_layers=4))
    assert (v11.tie_word_embeddings, v11.is_gated_act, v11.dense_act_fn, v11.num_layers, v11.num_decoder_layers,
            v11.decoder_start_token_id) == (False, True, "gelu_new", 6, 4, 0)
    v10 = t5.T5Config.from_hf(transformers.AutoConfig.for_model("t5"))
    assert v10.tie_word_embeddings and not v10.is_gated_act and v10.num_decoder_layers == 6
    mt5 = t5.T5Config.from_hf(transformers.AutoConfig.for_model("mt5"))
    assert (mt5.model_type, mt5.tie_word_embeddings, mt5.vocab_size) == ("mt5", False, 250112)
    assert t5.T5ForConditionalGeneration(mt5).hf_architecture == "MT5ForConditionalGeneration"
    with pytest.raises(ValueError, match="umt5 is not a t5 or mt5 config"):
        t5.T5Config.from_hf(transformers.AutoConfig.for_model("umt5"))
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-bogus'"):
        dataclasses.replace(v10, feed_forward_proj="gated-bogus")
    assert get_family("t5") is t5.FAMILY and get_family("mt5") is t5.FAMILY


def test_shift_right_and_cache_layout():
    labels = np.array([[5, 6, 1], [7, -100, -100]])
    np.testing.assert_array_equal(t5.shift_right(labels, 0, 0), [[0, 5, 6], [0, 7, 0]])
    shifted = t5.shift_right(jnp.asarray(labels), 3, 2)
    assert isinstance(shifted, jax.Array) and shifted.tolist() == [[3, 5, 6], [3, 7, 2]]
    cache = t5.T5ForConditionalGeneration(t5.T5Config(**TINY), dtype=jnp.bfloat16).init_cache(3, 5)
    assert cache["self"]["key"].shape == (2, 3, 5, 4, 8) and cache["self"]["value"].dtype == jnp.bfloat16
    assert int(cache["index"]) == 0 and cache["cross"] == {}

"""BERT/RoBERTa model code and the torch-free parts of hf_io: shapes, masks, full-size param counts, remat, bf16."""

import dataclasses
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
from flax import traverse_util  # noqa: E402

from flaxtrain import hf_export, hf_io  # noqa: E402
from flaxtrain.models import bert, get_family  # noqa: E402

# rbg keys: compiling the default threefry hash costs seconds per graph on a small CPU, and the model code is the
# same for any key implementation.
key = functools.partial(jax.random.key, impl="rbg")
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=32, initializer_range=0.2)


def tiny_config(model_type, **overrides):
    family = dict(type_vocab_size=1, pad_token_id=1) if model_type == "roberta" else {}
    return bert.BertConfig(**{**TINY, **family, **overrides}, model_type=model_type)


def batch(config, seed=0, batch_size=3, length=7):
    """Random ids with right padding (row 1 from position 4, row 2 from 1); pads hold pad_token_id."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (batch_size, length))
    mask = np.ones_like(ids)
    mask[1, 4:], mask[2, 1:] = 0, 0
    ids[mask == 0] = config.pad_token_id
    return jnp.asarray(ids), jnp.asarray(mask)


@functools.cache
def tiny_mlm(model_type):
    """(model, params, jitted apply): each distinct compilation costs seconds on a small CPU, so tests share them."""
    model = bert.BertForMaskedLM(tiny_config(model_type))
    return model, bert.init_params(model, key(0)), jax.jit(model.apply, static_argnames="deterministic")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_shapes_and_dtypes(model_type):
    model, params, _ = tiny_mlm(model_type)
    ids, mask = batch(model.config)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert params[model_type]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"].shape == (2, 32, 32)
    logits = jax.eval_shape(model.apply, {"params": params}, ids, mask)
    assert logits.shape == (3, 7, 99) and logits.dtype == jnp.float32

    classifier = bert.BertForSequenceClassification(dataclasses.replace(model.config, num_labels=3))
    cls_params = jax.eval_shape(functools.partial(bert.init_params, classifier), jax.random.key(1))
    logits = jax.eval_shape(classifier.apply, {"params": cls_params}, ids, mask)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    head = {"bert": {"classifier", "bert"}, "roberta": {"classifier", "roberta"}}[model_type]
    assert set(cls_params) == head and ("pooler" in cls_params[model_type]) == (model_type == "bert")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_padding_is_invisible(model_type):
    """Whatever sits under attention_mask == 0 cannot change the logits of the real tokens."""
    model, params, apply = tiny_mlm(model_type)
    ids, mask = batch(model.config)
    other = jnp.where(mask == 0, (ids + 7) % model.config.vocab_size, ids)
    longer_ids = jnp.concatenate([other, jnp.full((3, 2), model.config.pad_token_id)], axis=1)
    longer_mask = jnp.concatenate([mask, jnp.zeros((3, 2), mask.dtype)], axis=1)
    a = apply({"params": params}, ids, mask)
    b = apply({"params": params}, longer_ids, longer_mask)[:, :7]
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5)


def test_roberta_position_ids():
    config = tiny_config("roberta")
    ids = jnp.array([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    np.testing.assert_array_equal(bert.position_ids(ids, config), [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]])
    np.testing.assert_array_equal(bert.position_ids(ids, tiny_config("bert")), [list(range(6))] * 2)


def test_attention_dropout_path_matches_dot_product_attention():
    """The einsum path (taken while attention dropout is active) computes what jax.nn.dot_product_attention does:
    with a vanishing dropout rate the two agree, padding mask included."""
    attention = bert.BertSelfAttention(tiny_config("bert", attention_probs_dropout_prob=1e-9))
    x = jax.random.normal(key(0), (3, 7, 32))
    mask = batch(attention.config)[1].astype(bool)[:, None, None, :]
    variables = attention.init(key(1), x, mask, True)
    expected = attention.apply(variables, x, mask, True)
    got = attention.apply(variables, x, mask, False, rngs={"dropout": key(2)})
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_dropout_rngs_and_gradient_checkpointing():
    """Dropout follows the "dropout" rng; remat (under scan) changes neither logits nor gradients."""
    model, params, _ = tiny_mlm("roberta")
    ids, mask = batch(model.config)

    def step(module):
        def loss(p, rng):
            logits = module.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": rng})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5]), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    plain, remat = step(model), step(bert.BertForMaskedLM(model.config, gradient_checkpointing=True))
    (_, logits), grads = plain(params, key(1))
    assert not np.allclose(logits, plain(params, key(2))[0][1])
    (_, remat_logits), remat_grads = remat(params, key(1))
    np.testing.assert_allclose(remat_logits, logits, atol=1e-6)
    for x, y in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_bfloat16_computation(model_type):
    model, params, apply = tiny_mlm(model_type)
    ids, mask = batch(model.config)
    expected = apply({"params": params}, ids, mask)
    logits = jax.jit(bert.BertForMaskedLM(model.config, dtype=jnp.bfloat16).apply)({"params": params}, ids, mask)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - expected).max()) < 0.05 * float(jnp.abs(expected).max())


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_full_size_param_counts_equal_pytorch(model_type):
    """bert-base / roberta-base sized models, shapes only: the counts equal the transformers PyTorch models'."""
    torch = pytest.importorskip("torch")
    import transformers

    kw = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
    hf_config = transformers.AutoConfig.for_model(model_type, **(kw if model_type == "roberta" else {}))
    config = bert.BertConfig.from_hf(hf_config)
    for head, module in [("ForMaskedLM", bert.BertForMaskedLM), ("ForSequenceClassification",
                                                                  bert.BertForSequenceClassification)]:
        with torch.device("meta"):  # allocates nothing
            reference = getattr(transformers, module(config).hf_architecture)(hf_config)
        expected = sum(p.numel() for p in reference.parameters())  # tied weights are counted once
        shapes = jax.eval_shape(functools.partial(bert.init_params, module(config)), jax.random.key(0))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected
        if model_type == "bert" and head == "ForMaskedLM":
            assert expected == 109_514_298  # bert-base-uncased: body + MLM head


def test_config_from_hf_and_registry():
    import transformers

    hf = transformers.AutoConfig.for_model("roberta", hidden_size=64, num_attention_heads=4, classifier_dropout=0.3)
    config = bert.BertConfig.from_hf(hf)
    assert (config.model_type, config.hidden_size, config.pad_token_id, config.classifier_dropout) == (
        "roberta", 64, 1, 0.3)
    with pytest.raises(ValueError, match="is_decoder"):
        bert.BertConfig.from_hf(transformers.AutoConfig.for_model("bert", is_decoder=True))
    assert get_family("roberta") is bert.FAMILY and get_family("bert") is bert.FAMILY
    with pytest.raises(ValueError, match="'xlnet'.*supported model types: .*bert, .*roberta"):
        get_family("xlnet")


def assert_same_tree(a, b):
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


def test_state_dict_layouts_and_old_checkpoint_spellings(tmp_path):
    """Torch-free hf_io: layouts, per-layer keys, tolerated legacy keys, bare-body checkpoints, loud failures."""
    model, params, _ = tiny_mlm("bert")
    state = hf_io.params_to_state_dict(params, scanned=bert.FAMILY.hf.scanned)
    np.testing.assert_array_equal(state["bert.encoder.layer.1.intermediate.dense.weight"],
                                  params["bert"]["encoder"]["layer"]["intermediate"]["dense"]["kernel"][1].T)
    assert "cls.predictions.bias" in state and not any("decoder" in k for k in state)

    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}
    old["bert.embeddings.position_ids"] = np.arange(32)[None]
    old["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    safetensors.numpy.save_file(old, str(tmp_path / "model.safetensors"))
    template = jax.eval_shape(functools.partial(bert.init_params, model), jax.random.key(1))
    assert_same_tree(hf_io.load_pretrained(str(tmp_path), template, model_type="bert"), params)

    # transformers' AutoModel saves the body without the `bert.` prefix and without a head.
    bare = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    rules = dict(scanned=bert.FAMILY.hf.scanned, tied=bert.FAMILY.hf.tied, base_model_prefix="bert")
    assert_same_tree(hf_io.state_dict_to_params(bare, params, fresh=[r"^cls\."], **rules), params)
    with pytest.raises(ValueError, match="cls.predictions.bias is allowed fresh but the template has no values"):
        hf_io.state_dict_to_params(bare, template, fresh=[r"^cls\."], **rules)
    # An eval_shape'd template with `init`: called once where a weight is fresh, never where none is.
    calls = []

    def init():
        calls.append(1)
        return params

    assert_same_tree(hf_io.state_dict_to_params(bare, template, fresh=[r"^cls\."], init=init, **rules), params)
    assert_same_tree(hf_io.state_dict_to_params(state, template, fresh=[r"^cls\."], init=init, **rules), params)
    assert calls == [1]

    untied = dict(old, **{"cls.predictions.decoder.weight": old["cls.predictions.decoder.weight"] + 1})
    with pytest.raises(ValueError, match="differs"):
        hf_io.state_dict_to_params(untied, template, **rules)
    broken = {k: v for k, v in state.items() if "layer.1.output.dense" not in k} | {"extra.weight": np.zeros(1)}
    with pytest.raises(ValueError, match=r"2 missing key\(s\): bert\.encoder\.layer\.1\.output\.dense.*extra\.weight"):
        hf_io.state_dict_to_params(broken, template, **rules)


def test_atomic_save_and_bf16_checkpoint(tmp_path):
    import transformers

    model, params, _ = tiny_mlm("bert")
    hf_config = transformers.AutoConfig.for_model("bert", **TINY)
    hf_export.save_pretrained(str(tmp_path), params, hf_config, architecture=model.hf_architecture)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary left behind
    assert hf_config.architectures is None  # the caller's config is not modified
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["BertForMaskedLM"]
    state = hf_io.load_state_dict(str(tmp_path))
    safetensors.numpy.save_file({k: v.astype(jnp.bfloat16) for k, v in state.items()},
                                str(tmp_path / "model.safetensors"))
    loaded = hf_io.load_pretrained(str(tmp_path), params, model_type="bert")
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-6)

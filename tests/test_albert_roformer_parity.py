"""ALBERT and RoFormer against transformers' PyTorch models: logits on padded inputs, checkpoints both ways,
pretraining checkpoints under a fresh classifier head, the MLM head at `positions=`, full-size parameter counts,
refused configs; gradient checkpointing, bfloat16 and dropout, and RoFormer's frozen sinusoidal table."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io, training  # noqa: E402
from flaxtrain.models import albert, create, get_family, roformer  # noqa: E402
from tests.parity import (assert_bf16_remat_and_dropout, assert_close, assert_head_at_positions,  # noqa: E402
                          encoder_inputs, fresh_template, load_ours, param_count, param_shapes, random_params,
                          round_trip, torch_logits, torch_model, torch_param_count)

HEADS = {"ForMaskedLM": "MaskedLM", "ForSequenceClassification": "SequenceClassification"}
PREFIX = {"albert": "Albert", "roformer": "RoFormer"}


def hf_config(model_type, **overrides):
    # initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something; embeddings
    # narrower than hidden_size, so that both families' projections up and down are exercised; 3 layers, so that
    # ALBERT's shared layer is applied more than twice.
    settings = dict(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    return transformers.AutoConfig.for_model(model_type, **{**settings, **overrides})


def inputs(config):
    """Random ids with right padding (pads hold pad_token_id) and random segment ids."""
    return encoder_inputs(config, segments=True)


@pytest.mark.parametrize("model_type,head,overrides", [
    ("albert", "ForMaskedLM", {}),
    ("albert", "ForSequenceClassification", {}),
    ("roformer", "ForMaskedLM", {}),
    ("roformer", "ForSequenceClassification", {}),
    # Same widths (no embeddings_project) and the values rotated too.
    ("roformer", "ForMaskedLM", {"embedding_size": 32, "rotary_value": True}),
])
def test_logits_match_and_checkpoints_round_trip(model_type, head, overrides, tmp_path):
    reference = torch_model(PREFIX[model_type] + head, hf_config(model_type, **overrides))
    reference.save_pretrained(tmp_path / "theirs")
    model, params = load_ours(reference.config, HEADS[head], tmp_path / "theirs")
    assert model.hf_architecture == type(reference).__name__
    apply = jax.jit(model.apply)
    ids, mask, types = inputs(model.config)
    logits = apply({"params": params}, ids, mask, types)
    assert logits.dtype == jnp.float32
    assert_close(logits, torch_logits(reference, ids, mask, types), mask)

    # Our save loads in PyTorch with nothing missing or unexpected, holds the keys of theirs, and computes what we
    # compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path / "ours", tmp_path / "theirs")
    assert_close(apply({"params": params}, ids, mask, types), torch_logits(loaded, ids, mask, types), mask)


@pytest.mark.parametrize("model_type,architecture,loaded_pooler", [
    ("albert", "AlbertForMaskedLM", False),  # no pooler: a fresh one
    ("albert", "AlbertForPreTraining", True),  # the Hub's checkpoints: the pooler that sentence order trained
    ("roformer", "RoFormerForMaskedLM", False),
])
def test_pretraining_checkpoint_loads_under_a_fresh_head(model_type, architecture, loaded_pooler, tmp_path):
    pretrained = torch_model(architecture, hf_config(model_type))
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, "SequenceClassification")
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(predictions|cls)"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=model_type)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=model_type, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    if model_type == "albert":
        assert all((x == 0.5).all() != loaded_pooler for x in jax.tree.leaves(params["albert"]["pooler"]))
    body = hf_io.params_to_state_dict({model_type: params[model_type]}, scanned=family.hf.scanned,
                                      renamed=family.hf.renamed)
    theirs = {k: v.numpy() for k, v in pretrained.state_dict().items() if k.startswith(model_type + ".")}
    assert body.keys() == theirs.keys() | ({"albert.pooler.weight", "albert.pooler.bias"}
                                           if model_type == "albert" and not loaded_pooler else set())
    for name, value in theirs.items():
        np.testing.assert_array_equal(body[name], value, err_msg=name)


def test_albert_pretraining_checkpoint_into_masked_lm(tmp_path):
    """The Hub's ALBERT checkpoints are AlbertForPreTraining: with its sentence-order head and pooler dropped, our
    MLM computes its prediction logits."""
    pretrained = torch_model("AlbertForPreTraining", hf_config("albert"))
    pretrained.save_pretrained(tmp_path)
    _, model = create(pretrained.config, "MaskedLM")
    params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="albert",
                                   drop=(r"^sop_classifier\.", r"^albert\.pooler\."))
    ids, mask, types = inputs(model.config)
    with torch.no_grad():
        theirs = pretrained(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            token_type_ids=torch.tensor(types)).prediction_logits.numpy()
    np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, ids, mask, types)[mask == 1],
                               theirs[mask == 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["albert", "roformer"])
def test_masked_lm_at_positions_is_the_full_head_there(model_type):
    """run_mlm_flax.py asks for the logits of the masked tokens only (`positions=`)."""
    _, model = create(hf_config(model_type), "MaskedLM")
    positions = np.array([[0, 4, 8], [4, 1, 1], [2, 7, 0]], np.int32)
    assert_head_at_positions(model, inputs(model.config), positions)


# albert-base-v2 and junnyu/roformer_chinese_base, their config.json values.
FULL_SIZE = {
    "albert": dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                   hidden_act="gelu_new"),
    "roformer": dict(vocab_size=50000, embedding_size=768, hidden_size=768, num_hidden_layers=12,
                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=1536, type_vocab_size=2,
                     hidden_act="gelu"),
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("model_type", list(FULL_SIZE))
def test_full_size_parameter_count(model_type, head):
    """RoFormer's frozen sinusoidal table counts on both sides: PyTorch keeps it as a Parameter, we as a param."""
    config = transformers.AutoConfig.for_model(model_type, **FULL_SIZE[model_type])
    theirs = torch_param_count(getattr(transformers, PREFIX[model_type] + head), config)
    assert param_count(create(config, HEADS[head])[1]) == theirs
    if model_type == "albert" and head == "ForMaskedLM":
        assert 11_000_000 < theirs < 12_000_000  # ALBERT-base's 12M: one layer's weights, shared


def test_configs_from_hf_and_refusals():
    config = albert.AlbertConfig.from_hf(hf_config("albert", classifier_dropout_prob=0.3))
    assert (config.embedding_size, config.hidden_size, config.classifier_dropout_prob) == (16, 32, 0.3)
    assert config.hidden_act == "gelu_new" and get_family("albert") is albert.FAMILY
    assert albert.FAMILY.max_positions(config) == 32
    for name in ("num_hidden_groups", "inner_group_num"):
        with pytest.raises(ValueError, match=f"{name}=2"):
            albert.AlbertConfig.from_hf(hf_config("albert", **{name: 2}))
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        albert.AlbertConfig.from_hf(hf_config("albert", tie_word_embeddings=False))

    config = roformer.RoFormerConfig.from_hf(hf_config("roformer", rotary_value=True, embedding_size=None))
    assert (config.embedding_width, config.rotary_value, config.max_position_embeddings) == (32, True, 32)
    assert roformer.FAMILY.max_positions(config) == 32 and get_family("roformer") is roformer.FAMILY
    with pytest.raises(ValueError, match="is_decoder=True"):
        roformer.RoFormerConfig.from_hf(hf_config("roformer", is_decoder=True))
    with pytest.raises(ValueError, match="head size 5.*odd"):
        roformer.RoFormerConfig.from_hf(hf_config("roformer", hidden_size=20))
    # The table is transformers' own.
    reference = transformers.models.roformer.modeling_roformer.RoFormerSinusoidalPositionalEmbedding(32, 8)
    np.testing.assert_array_equal(roformer.sinusoidal_table(32, 8), reference.create_weight().numpy())


@pytest.mark.parametrize("model_type", ["albert", "roformer"])
def test_gradient_checkpointing_bfloat16_and_dropout(model_type):
    """The model a training run builds: with remat and bfloat16 its logits stay float32 and close to float32's,
    its gradients are those without remat, and dropout follows the "dropout" rng."""
    config = hf_config(model_type, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ids, mask, types = inputs(config)
    model, params, _ = assert_bf16_remat_and_dropout(config, "SequenceClassification", (ids, mask, types))

    if model_type == "albert":  # (RoFormer's layers are scanned as BERT's, whose remat gradients test_bert.py checks)
        remat = create(config, "SequenceClassification", gradient_checkpointing=True)[1]
        grad = lambda m: jax.jit(jax.grad(lambda p: m.apply(p, ids, mask, types).sum()))(params)  # noqa: E731
        for x, y in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat))):
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_roformer_sinusoidal_table_is_never_trained():
    """A step of AdamW with weight decay leaves the table as it was (zero gradient, not in the decay mask), while
    the weights around it move."""
    _, model = create(hf_config("roformer", num_hidden_layers=1), "SequenceClassification")
    params = random_params(model)
    ids, mask, types = inputs(model.config)
    tx = training.make_optimizer(1e-2, weight_decay=0.1)

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: model.apply({"params": p}, ids, mask, types).sum())(params)
        return grads, tx.update(grads, tx.init(params), params)[0]

    grads, updates = step(params)
    assert not np.asarray(grads["roformer"]["encoder"]["embed_positions"]["weight"]).any()
    assert not np.asarray(updates["roformer"]["encoder"]["embed_positions"]["weight"]).any()
    assert np.asarray(updates["roformer"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"]).any()

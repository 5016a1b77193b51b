"""ModernBERT and DeBERTa-v2/v3 against transformers' PyTorch models: logits on padded inputs, checkpoints both ways,
pretraining checkpoints under a classifier, the MLM head at `positions=`, full-size parameter counts, refused
configs, DeBERTa's log buckets; gradient checkpointing, bfloat16 and dropout."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import create, deberta_v2, get_family, modernbert  # noqa: E402
from tests.parity import (assert_bf16_remat_and_dropout, assert_close, assert_head_at_positions,  # noqa: E402
                          encoder_inputs, fresh_template, load_ours, param_count, param_shapes, round_trip,
                          torch_logits, torch_model, torch_param_count)

HEADS = {"ForMaskedLM": "MaskedLM", "ForSequenceClassification": "SequenceClassification"}
PREFIX = {"modernbert": "ModernBert", "deberta-v2": "DebertaV2"}


def hf_config(model_type, **overrides):
    # initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
    settings = dict(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=64, initializer_range=0.2, num_labels=3, pad_token_id=0)
    if model_type == "modernbert":
        # A window of +-2 and every other layer global: 11 tokens see both kinds of layer differ; all the biases.
        settings.update(intermediate_size=24, local_attention=4, global_attn_every_n_layers=2, global_rope_theta=500.0,
                        norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True, bos_token_id=1,
                        eos_token_id=2, cls_token_id=1, sep_token_id=2)
    else:
        # DeBERTa-v3's settings, with buckets small enough that 11 tokens reach the log-spaced ones.
        settings.update(num_hidden_layers=2, relative_attention=True, position_buckets=4, pos_att_type="p2c|c2p",
                        share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                        max_relative_positions=-1, type_vocab_size=0)
    return transformers.AutoConfig.for_model(model_type, **{**settings, **overrides})


def inputs(config):
    """[3, 11] random ids with right padding (pads hold pad_token_id), random segment ids where there are two."""
    return encoder_inputs(config, segments=getattr(config, "type_vocab_size", 0) > 1, length=11, right_from=6)


@pytest.mark.parametrize("model_type,head,overrides", [
    ("modernbert", "ForMaskedLM", {}),
    ("modernbert", "ForSequenceClassification", {}),
    ("modernbert", "ForSequenceClassification", {"classifier_pooling": "mean", "attn_implementation": "eager"}),
    # ModernBERT-base's biases: none but the decoder's and the classifier's.
    ("modernbert", "ForMaskedLM", {"norm_bias": False, "attention_bias": False, "mlp_bias": False,
                                   "classifier_bias": False, "global_attn_every_n_layers": 3}),
    # Scaled RoPE, each layer type with its own base.
    ("modernbert", "ForMaskedLM", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                    "original_max_position_embeddings": 32}}),
    ("deberta-v2", "ForMaskedLM", {}),  # legacy: `cls.predictions`, as DeBERTa-v3's configs get it
    ("deberta-v2", "ForMaskedLM", {"legacy": False}),  # `lm_predictions.lm_head`
    ("deberta-v2", "ForSequenceClassification", {}),
    # DeBERTa-v2's other settings: separate position projections, c2p alone, absolute positions, token types,
    # narrower embeddings, no buckets.
    ("deberta-v2", "ForSequenceClassification", {"share_att_key": False, "pos_att_type": "c2p",
                                                 "position_biased_input": True, "type_vocab_size": 2,
                                                 "embedding_size": 16, "position_buckets": -1,
                                                 "max_relative_positions": 6, "norm_rel_ebd": "none"}),
    ("deberta-v2", "ForMaskedLM", {"share_att_key": False, "pos_att_type": "p2c", "embedding_size": 16}),
])
def test_logits_match_and_checkpoints_round_trip(model_type, head, overrides, tmp_path):
    reference = torch_model(PREFIX[model_type] + head, hf_config(model_type, **overrides))
    reference.save_pretrained(tmp_path / "theirs")
    model, params = load_ours(reference.config, HEADS[head], tmp_path / "theirs")
    assert model.hf_architecture == type(reference).__name__
    apply = jax.jit(model.apply)
    ids, mask, types = inputs(reference.config)
    logits = apply({"params": params}, ids, mask, types)
    assert logits.dtype == jnp.float32
    assert_close(logits, torch_logits(reference, ids, mask, types), mask)

    # Our save loads in PyTorch with nothing missing or unexpected, holds the keys of theirs, and computes what we
    # compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path / "ours", tmp_path / "theirs")
    assert_close(apply({"params": params}, ids, mask, types), torch_logits(loaded, ids, mask, types), mask)


@pytest.mark.parametrize("model_type,fresh", [
    ("modernbert", ("classifier",)),  # the MLM checkpoint's `head` has the classifier's names: loaded, as transformers
    ("deberta-v2", ("classifier", "pooler")),
])
def test_masked_lm_checkpoint_loads_under_a_fresh_classifier(model_type, fresh, tmp_path):
    pretrained = torch_model(PREFIX[model_type] + "ForMaskedLM", hf_config(model_type))
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, "SequenceClassification")
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(decoder|cls)"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=model_type)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=model_type, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert set(params) - set(fresh) == ({"model", "head"} if model_type == "modernbert" else {"deberta"})
    for name in fresh:
        assert all((x == 0.5).all() for x in jax.tree.leaves(params[name])), name
    loaded = hf_io.params_to_state_dict({k: v for k, v in params.items() if k not in fresh},
                                        scanned=family.hf.scanned, renamed=family.hf.renamed)
    theirs = {k: v.numpy() for k, v in pretrained.state_dict().items() if k in loaded}
    assert loaded.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)

    # The same classifier, as transformers builds it from that checkpoint, computes what ours computes.
    ours = np.asarray(jax.jit(classifier.apply)({"params": params}, *inputs(pretrained.config)))
    reference = getattr(transformers, classifier.hf_architecture).from_pretrained(tmp_path).eval()
    state = hf_io.params_to_state_dict({k: v for k, v in params.items() if k in fresh})
    reference.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    np.testing.assert_allclose(ours, torch_logits(reference, *inputs(pretrained.config)), atol=1e-5, rtol=1e-5)


def test_deberta_v3_hub_checkpoint_layout(tmp_path):
    """The Hub's DeBERTa checkpoints keep the MLM head as `lm_predictions.lm_head` (which their configs, lacking
    `legacy`, do not use: transformers builds `cls.predictions` and leaves it fresh), DeBERTa-v3's its
    replaced-token-detection head `mask_predictions`, and some an unused absolute-position table. A classifier
    loads the body and drops the rest; an MLM with legacy=False loads lm_predictions."""
    import safetensors.numpy

    reference = torch_model("DebertaV2ForMaskedLM", hf_config("deberta-v2", legacy=False))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    state.update({"mask_predictions.dense.weight": np.ones((32, 32), np.float32),
                  "mask_predictions.classifier.bias": np.ones(1, np.float32),
                  "deberta.embeddings.position_embeddings.weight": np.ones((64, 32), np.float32)})
    safetensors.numpy.save_file(state, tmp_path / "model.safetensors")
    family, classifier = create(hf_config("deberta-v2"), "SequenceClassification")
    params = hf_io.load_pretrained(str(tmp_path), fresh_template(classifier), model_type="deberta-v2",
                                   fresh=family.hf.classifier_head, drop=family.hf.pretraining_heads)
    np.testing.assert_array_equal(params["deberta"]["encoder"]["rel_embeddings"]["embedding"],
                                  state["deberta.encoder.rel_embeddings.weight"])
    assert all((x == 0.5).all() for x in jax.tree.leaves((params["pooler"], params["classifier"])))

    _, model = create(reference.config, "MaskedLM")
    params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type="deberta-v2")
    ids, mask, types = inputs(reference.config)
    assert_close(jax.jit(model.apply)({"params": params}, ids, mask, types), torch_logits(reference, ids, mask, types),
                 mask)


@pytest.mark.parametrize("model_type", ["modernbert", "deberta-v2"])
def test_masked_lm_at_positions_is_the_full_head_there(model_type):
    """run_mlm_flax.py asks for the logits of the masked tokens only (`positions=`)."""
    config = hf_config(model_type)
    _, model = create(config, "MaskedLM")
    positions = np.array([[0, 4, 10], [4, 1, 1], [2, 7, 0]], np.int32)
    assert_head_at_positions(model, inputs(config), positions)


# answerdotai/ModernBERT-base and microsoft/deberta-v3-base, their config.json values.
FULL_SIZE = {
    "modernbert": dict(vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                       intermediate_size=1152, max_position_embeddings=8192, global_attn_every_n_layers=3,
                       local_attention=128, global_rope_theta=160000.0, local_rope_theta=10000.0, norm_bias=False,
                       attention_bias=False, mlp_bias=False, classifier_pooling="mean", hidden_activation="gelu",
                       pad_token_id=50283),
    "deberta-v2": dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
                       position_buckets=256, pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm",
                       position_biased_input=False, max_relative_positions=-1, layer_norm_eps=1e-7,
                       hidden_act="gelu", pooler_hidden_size=768, pooler_dropout=0, pooler_hidden_act="gelu"),
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("model_type", list(FULL_SIZE))
def test_full_size_parameter_count(model_type, head):
    config = transformers.AutoConfig.for_model(model_type, **FULL_SIZE[model_type])
    theirs = torch_param_count(getattr(transformers, PREFIX[model_type] + head), config)
    assert param_count(create(config, HEADS[head])[1]) == theirs
    if head == "ForMaskedLM":  # the published sizes: 149M, and 184M (86M body + 98M embeddings)
        low = {"modernbert": 149_000_000, "deberta-v2": 184_000_000}[model_type]
        assert low < theirs < low + 1_000_000, theirs


def test_configs_from_hf_and_refusals():
    config = modernbert.ModernBertConfig.from_hf(hf_config("modernbert", global_attn_every_n_layers=3))
    assert config.layer_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    assert dict(config.global_rope)["rope_theta"] == 500.0 and dict(config.local_rope)["rope_theta"] == 10000.0
    assert get_family("modernbert") is modernbert.FAMILY and modernbert.FAMILY.max_positions(config) == 64
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        modernbert.ModernBertConfig.from_hf(hf_config("modernbert", tie_word_embeddings=False))
    with pytest.raises(ValueError, match="classifier_pooling 'max'"):
        modernbert.ModernBertConfig(classifier_pooling="max")
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        modernbert.ModernBertConfig.from_hf(hf_config("modernbert", rope_scaling={"rope_type": "dynamic",
                                                                                  "factor": 2.0}))

    config = deberta_v2.DebertaV2Config.from_hf(hf_config("deberta-v2"))
    assert (config.pos_att_type, config.span, config.max_relative, config.legacy) == (("p2c", "c2p"), 4, 64, True)
    assert get_family("deberta-v2") is deberta_v2.FAMILY and deberta_v2.FAMILY.max_positions(config) == 64
    # transformers' defaults for the attributes its config class leaves undeclared: DeBERTa-v2 without them.
    bare = deberta_v2.DebertaV2Config.from_hf(transformers.DebertaV2Config())
    assert (bare.relative_attention, bare.share_att_key, bare.position_buckets, bare.pos_att_type,
            bare.norm_rel_ebd, bare.position_biased_input) == (False, False, -1, (), "none", True)
    for name, value in (("conv_kernel_size", 3), ("pooler_hidden_size", 16), ("tie_word_embeddings", False)):
        with pytest.raises(ValueError, match=f"{name}={value}"):
            deberta_v2.DebertaV2Config.from_hf(hf_config("deberta-v2", **{name: value}))
    with pytest.raises(ValueError, match="pos_att_type.*p2p"):
        deberta_v2.DebertaV2Config.from_hf(hf_config("deberta-v2", pos_att_type="p2c|p2p"))


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (4, 64), (32, 100)])
def test_deberta_log_buckets_are_transformers(buckets, max_position):
    """Every distance of a 512-token input falls in transformers' bucket (float32 rounding at the boundaries)."""
    relative = np.arange(512)[:, None] - np.arange(512)[None, :]
    theirs = transformers.models.deberta_v2.modeling_deberta_v2.make_log_bucket_position(
        torch.tensor(relative), buckets, max_position).long().numpy()
    np.testing.assert_array_equal(deberta_v2.log_bucket_position(relative, buckets, max_position), theirs)


@pytest.mark.parametrize("model_type", ["modernbert", "deberta-v2"])
def test_gradient_checkpointing_bfloat16_and_dropout(model_type):
    """The model a training run builds: with remat and bfloat16 its logits stay float32 and close to float32's,
    its gradients are those without remat, and dropout follows the "dropout" rng."""
    dropout = ({"attention_dropout": 0.1, "mlp_dropout": 0.1, "embedding_dropout": 0.1} if model_type == "modernbert"
               else {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})
    config = hf_config(model_type, **dropout)
    ids, mask, types = inputs(config)
    model, params, _ = assert_bf16_remat_and_dropout(config, "SequenceClassification", (ids, mask, types))

    remat = create(config, "SequenceClassification", gradient_checkpointing=True)[1]
    grad = lambda m: jax.jit(jax.grad(lambda p: m.apply(p, ids, mask, types).sum()))(params)  # noqa: E731
    for x, y in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat))):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)

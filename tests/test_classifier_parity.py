"""Sequence classifiers of the encoder families (BERT, RoBERTa, ELECTRA, DistilBERT) against transformers' PyTorch
ones: logits, checkpoints both ways, pretraining checkpoints under a fresh head, refusals; ELECTRA and DistilBERT
under gradient checkpointing, bfloat16 and dropout. BERT/RoBERTa parity for num_labels=3 is in test_bert_parity.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import create, distilbert, electra, get_family  # noqa: E402
from tests.parity import (assert_bf16_remat_and_dropout, encoder_inputs, fresh_template, load_ours,  # noqa: E402
                          param_shapes, round_trip, torch_logits)


def hf_config(model_type, **overrides):
    # initializer_range 0.2 (not 0.02) so that the classifier logits are large enough for atol to mean something.
    if model_type == "distilbert":
        settings = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    else:
        settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    settings.update(vocab_size=99, max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    if model_type == "roberta":
        settings.update(type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
    if model_type == "electra":
        settings.update(embedding_size=16)  # != hidden_size: the body has embeddings_project
    return transformers.AutoConfig.for_model(model_type, **{**settings, **overrides})


def inputs(config):
    """Random ids with right padding (pads hold pad_token_id), random segment ids where the family has two and for
    DistilBERT, which has none: ours must ignore what theirs never sees."""
    return encoder_inputs(config, segments=getattr(config, "type_vocab_size", 2) > 1)


def torch_model(model_type, architecture, **overrides):
    torch.manual_seed(0)
    cls, config = getattr(transformers, architecture), hf_config(model_type, **overrides)
    return (cls.from_config(config) if architecture.startswith("Auto") else cls(config)).eval()


@pytest.mark.parametrize("model_type,num_labels", [("bert", 1), ("roberta", 1), ("electra", 3), ("electra", 1),
                                                   ("distilbert", 3), ("distilbert", 1)])
def test_logits_match_pytorch_and_checkpoints_round_trip(model_type, num_labels, tmp_path):
    problem = {"problem_type": "regression"} if num_labels == 1 else {}
    reference = torch_model(model_type, "AutoModelForSequenceClassification", num_labels=num_labels, **problem)
    reference.save_pretrained(tmp_path / "theirs")
    model, params = load_ours(reference.config, "SequenceClassification", tmp_path / "theirs")
    assert model.hf_architecture == type(reference).__name__
    assert (model.config.num_labels, model.config.problem_type) == (num_labels, problem.get("problem_type"))
    apply = jax.jit(model.apply)
    ids, mask, types = inputs(model.config)
    logits = apply({"params": params}, ids, mask, types)
    assert logits.shape == (3, num_labels) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, torch_logits(reference, ids, mask, types), atol=1e-5, rtol=1e-5)

    # Our save loads in PyTorch with nothing missing or unexpected and computes what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path / "ours",
                                auto=transformers.AutoModelForSequenceClassification)
    np.testing.assert_allclose(apply({"params": params}, ids, mask, types), torch_logits(loaded, ids, mask, types),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type,architecture,head", [
    ("electra", "ElectraForPreTraining", "discriminator_predictions"),
    ("electra", "ElectraForMaskedLM", "generator_"),
    ("electra", "AutoModel", None),
    ("distilbert", "DistilBertForMaskedLM", "vocab_"),
    ("distilbert", "AutoModel", None),
])
def test_pretraining_checkpoint_loads_under_a_fresh_head(model_type, architecture, head, tmp_path):
    pretrained = torch_model(model_type, architecture)
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, "SequenceClassification")
    template = fresh_template(classifier)
    unexpected = rf".*unexpected key\(s\):.*{head}" if head else ""
    with pytest.raises(ValueError, match=rf"missing key\(s\):.*classifier\.{unexpected}"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=model_type)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=model_type, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    prefix = family.hf.base_prefix[model_type]
    assert set(params) == set(template) and all((x == 0.5).all() for name, subtree in params.items()
                                                if name != prefix for x in jax.tree.leaves(subtree))
    body = hf_io.params_to_state_dict({prefix: params[prefix]}, scanned=family.hf.scanned)
    theirs = {k if k.startswith(prefix + ".") else f"{prefix}.{k}": v.numpy()
              for k, v in pretrained.state_dict().items() if head is None or not k.startswith(head)}
    assert body.keys() == theirs.keys()
    for name, value in body.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


@pytest.mark.parametrize("source,target,overrides,error", [
    (("bert", "BertForMaskedLM"), "electra", {},
     r"missing key\(s\): electra\.embeddings.*unexpected key\(s\): bert\.embeddings"),
    (("electra", "ElectraForPreTraining"), "distilbert", {},
     r"missing key\(s\): distilbert\.embeddings.*unexpected key\(s\):.*electra\.embeddings"),
    (("electra", "ElectraForPreTraining"), "electra", {"embedding_size": 24},
     r"shape mismatch\(es\):.*electra\.embeddings\.word_embeddings\.weight: expected \(99, 24\), found \(99, 16\)"),
    (("distilbert", "DistilBertForMaskedLM"), "distilbert", {"dim": 48},
     r"shape mismatch\(es\): distilbert\.embeddings\.LayerNorm\.bias: expected \(48,\), found \(32,\)"),
])
def test_other_family_or_size_is_refused(source, target, overrides, error, tmp_path):
    torch_model(*source).save_pretrained(tmp_path)
    family, classifier = create(hf_config(target, **overrides), "SequenceClassification")
    with pytest.raises(ValueError, match=error):
        hf_io.load_pretrained(str(tmp_path), fresh_template(classifier), model_type=target,
                              fresh=family.hf.classifier_head, drop=family.hf.pretraining_heads)


@pytest.mark.parametrize("model_type", ["electra", "distilbert"])
def test_gradient_checkpointing_bfloat16_and_dropout(model_type):
    """The model a training run builds: with remat and bfloat16 computation its logits stay float32 and close to
    float32's, and dropout (attention dropout included) follows the "dropout" rng. Remat's gradients under
    `bert.scan_layers`, which both families use, are checked in test_bert.py."""
    config = hf_config(model_type)
    assert_bf16_remat_and_dropout(config, "SequenceClassification", inputs(config))


def test_configs_from_hf():
    config = electra.ElectraConfig.from_hf(hf_config("electra", classifier_dropout=0.3))
    assert (config.embedding_size, config.hidden_size, config.classifier_dropout) == (16, 32, 0.3)
    assert electra.FAMILY.max_positions(config) == 32 and get_family("electra") is electra.FAMILY
    same_width = electra.ElectraForSequenceClassification(
        electra.ElectraConfig.from_hf(hf_config("electra", embedding_size=32)))
    # As transformers: only when the widths differ.
    assert "embeddings_project" not in param_shapes(same_width)["electra"]
    with pytest.raises(ValueError, match="is_decoder=True"):
        electra.ElectraConfig.from_hf(hf_config("electra", is_decoder=True))
    with pytest.raises(ValueError, match="'bert' is not one of ElectraConfig's"):
        electra.ElectraConfig(model_type="bert")

    config = distilbert.DistilBertConfig.from_hf(hf_config("distilbert", seq_classif_dropout=0.3, activation="relu"))
    assert (config.dim, config.hidden_size, config.n_layers, config.seq_classif_dropout, config.activation) == (
        32, 32, 2, 0.3, "relu")
    assert distilbert.max_positions(config) == 32 and get_family("distilbert") is distilbert.FAMILY
    with pytest.raises(ValueError, match="sinusoidal_pos_embds=True"):
        distilbert.DistilBertConfig.from_hf(hf_config("distilbert", sinusoidal_pos_embds=True))
    with pytest.raises(ValueError, match="model_type 'electra' is not supported for this task"):
        create(hf_config("electra"), "CausalLM")

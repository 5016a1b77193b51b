"""XLM-RoBERTa, RoBERTa-PreLayerNorm, and the ELECTRA generator and DistilBERT as masked LMs, against transformers'
PyTorch models: logits on padded inputs, checkpoints both ways, the MLM head at the masked positions only, an MLM
checkpoint under a fresh classifier, full-size parameter counts."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import create, distilbert, get_family, roberta_prelayernorm  # noqa: E402
from tests.parity import (assert_bf16_remat_and_dropout, assert_close, encoder_inputs, fresh_template,  # noqa: E402
                          load_ours, param_count, round_trip, torch_logits, torch_param_count)

AUTO = {"MaskedLM": transformers.AutoModelForMaskedLM,
        "SequenceClassification": transformers.AutoModelForSequenceClassification}


def hf_config(model_type, **overrides):
    # initializer_range 0.2 (not 0.02) so that the logits are large enough for atol to mean something.
    if model_type == "distilbert":
        # gelu_new: the MLM head's activation must be the config's, not a fixed gelu.
        settings = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, activation="gelu_new")
    else:
        settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    settings.update(vocab_size=99, max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    if model_type in ("xlm-roberta", "roberta-prelayernorm"):
        # xlm-roberta's Hub configs have one token type; the pre-LN model keeps two, to test segment ids.
        settings.update(type_vocab_size=1 if model_type == "xlm-roberta" else 2, pad_token_id=1, layer_norm_eps=1e-5)
    if model_type == "electra":
        # embedding_size != hidden_size: embeddings_project and a generator head of its own width; gelu_new: the
        # generator's gelu must not follow hidden_act.
        settings.update(embedding_size=16, hidden_act="gelu_new")
    return transformers.AutoConfig.for_model(model_type, **{**settings, **overrides})


def inputs(config):
    """Random ids with right padding (pads hold pad_token_id), random segment ids where the model has two."""
    return encoder_inputs(config, segments=getattr(config, "type_vocab_size", 1) > 1)


def torch_model(model_type, head, **overrides):
    torch.manual_seed(0)
    return AUTO[head].from_config(hf_config(model_type, **overrides)).eval()


CASES = [("xlm-roberta", "MaskedLM", "XLMRobertaForMaskedLM"),
         ("xlm-roberta", "SequenceClassification", "XLMRobertaForSequenceClassification"),
         ("roberta-prelayernorm", "MaskedLM", "RobertaPreLayerNormForMaskedLM"),
         ("roberta-prelayernorm", "SequenceClassification", "RobertaPreLayerNormForSequenceClassification"),
         ("electra", "MaskedLM", "ElectraForMaskedLM"),
         ("distilbert", "MaskedLM", "DistilBertForMaskedLM")]


@pytest.mark.parametrize("model_type,head,architecture", CASES)
def test_logits_match_pytorch_and_checkpoints_round_trip(model_type, head, architecture, tmp_path):
    reference = torch_model(model_type, head)
    assert type(reference).__name__ == architecture
    reference.save_pretrained(tmp_path / "theirs")
    model, params = load_ours(reference.config, head, tmp_path / "theirs")
    assert model.hf_architecture == architecture
    apply = jax.jit(model.apply)
    ids, mask, types = inputs(model.config)
    assert_close(apply({"params": params}, ids, mask, types), torch_logits(reference, ids, mask, types), mask)

    # Our save loads in PyTorch with nothing missing or unexpected, holds the keys theirs holds, and computes what
    # we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path / "ours", tmp_path / "theirs",
                                auto=AUTO[head])
    logits = apply({"params": params}, ids, mask, types)
    assert_close(logits, torch_logits(loaded, ids, mask, types), mask)

    if head == "MaskedLM":  # run_mlm_flax.py runs the head only at the masked positions: the same logits there
        positions = np.array([[1, 4, 0], [2, 3, 4], [0, 1, 1]])
        at = jax.jit(functools.partial(model.apply, positions=positions))({"params": params}, ids, mask, types)
        np.testing.assert_allclose(at, np.take_along_axis(logits, positions[..., None], axis=1), atol=1e-6,
                                   rtol=1e-6)


@pytest.mark.parametrize("model_type,architecture,head", [
    ("xlm-roberta", "AutoModelForMaskedLM", r"lm_head\."),
    ("roberta-prelayernorm", "AutoModelForMaskedLM", r"lm_head\."),
    ("roberta-prelayernorm", "AutoModel", r"roberta_prelayernorm\.pooler\."),  # the bare model has a pooler
])
def test_mlm_checkpoint_loads_under_a_fresh_classifier(model_type, architecture, head, tmp_path):
    torch.manual_seed(0)
    pretrained = getattr(transformers, architecture).from_config(hf_config(model_type))
    pretrained.save_pretrained(tmp_path)
    family, classifier = create(pretrained.config, "SequenceClassification")
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=rf"missing key\(s\):.*classifier\..*unexpected key\(s\):.*{head}"):
        hf_io.load_pretrained(str(tmp_path), template, model_type=model_type)

    params = hf_io.load_pretrained(str(tmp_path), template, model_type=model_type, fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    prefix = family.hf.base_prefix[model_type]
    assert set(params) == {prefix, "classifier"}
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    body = hf_io.params_to_state_dict({prefix: params[prefix]}, scanned=family.hf.scanned)
    theirs = {k if k.startswith(prefix + ".") else f"{prefix}.{k}": v.numpy()
              for k, v in pretrained.state_dict().items() if not k.startswith("lm_head.")}
    theirs = {k: v for k, v in theirs.items() if not k.startswith(f"{prefix}.pooler.")}
    assert body.keys() == theirs.keys()
    for name, value in body.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


@pytest.mark.parametrize("name,model_type,settings", [
    ("xlm-roberta-base", "xlm-roberta",
     dict(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)),
    ("roberta-base-sized pre-LN", "roberta-prelayernorm",
     dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)),
    ("google/electra-small-generator", "electra",
     dict(embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=1024,
          vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)),
    ("distilbert-base-uncased", "distilbert",
     dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512)),
])
def test_full_size_param_counts_equal_pytorch(name, model_type, settings):
    """Shapes only: every head's count equals the transformers PyTorch model's (tied weights counted once)."""
    config = transformers.AutoConfig.for_model(model_type, **settings)
    family = get_family(model_type)
    for head in family.heads:
        model = create(config, head)[1]
        assert param_count(model) == torch_param_count(getattr(transformers, model.hf_architecture), config), (
            name, head)


def test_configs_from_hf():
    config = roberta_prelayernorm.RobertaPreLayerNormConfig.from_hf(hf_config("roberta-prelayernorm"))
    assert (config.model_type, config.pad_token_id, config.is_roberta) == ("roberta-prelayernorm", 1, True)
    assert get_family("roberta-prelayernorm").max_positions(config) == 30  # fairseq positions start at pad + 1
    with pytest.raises(ValueError, match="is_decoder=True"):
        roberta_prelayernorm.RobertaPreLayerNormConfig.from_hf(hf_config("roberta-prelayernorm", is_decoder=True))
    family, model = create(hf_config("xlm-roberta"), "MaskedLM")
    assert family is get_family("roberta") and family.max_positions(model.config) == 30
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        distilbert.DistilBertConfig.from_hf(hf_config("distilbert", tie_word_embeddings=False))


def test_pre_layer_norm_with_gradient_checkpointing_bfloat16_and_dropout():
    """The model run_mlm_flax.py builds, for the new pre-LN layer: with remat and bfloat16 computation the logits at
    the masked positions stay float32 and close to float32's, and dropout follows the "dropout" rng. (ELECTRA's and
    DistilBERT's bodies are checked so in test_classifier_parity.py.)"""
    config = hf_config("roberta-prelayernorm")
    positions = np.array([[1, 4], [2, 3], [0, 1]])
    _, _, logits = assert_bf16_remat_and_dropout(config, "MaskedLM", inputs(config), positions=positions)
    assert logits.shape == (3, 2, config.vocab_size)

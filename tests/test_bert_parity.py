"""Parity with transformers' PyTorch BERT/RoBERTa: load their checkpoints, match their logits, write checkpoints they
load without missing, unexpected or mismatched keys."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io  # noqa: E402
from flaxtrain.models import bert  # noqa: E402
from tests.parity import encoder_inputs, fresh_template, param_shapes, round_trip, torch_logits  # noqa: E402

HEADS = {"ForMaskedLM": bert.BertForMaskedLM, "ForSequenceClassification": bert.BertForSequenceClassification}
PREFIX = {"bert": "Bert", "roberta": "Roberta"}


def hf_config(model_type, **overrides):
    # initializer_range 0.2 (not 0.02) so that the classifier logits are large enough for atol to mean something.
    settings = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    if model_type == "roberta":
        settings.update(type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
    return transformers.AutoConfig.for_model(model_type, **{**settings, **overrides})


@functools.cache
def torch_checkpoint(model_type, head, tmp_root):
    """(PyTorch model in eval mode, the directory it saved itself to)."""
    torch.manual_seed(0)
    model = getattr(transformers, PREFIX[model_type] + head)(hf_config(model_type)).eval()
    path = os.path.join(tmp_root, f"{model_type}{head}")
    model.save_pretrained(path)
    return model, path


def inputs(config):
    """Random ids with right padding (pads hold pad_token_id, as tokenizers write) and, for BERT, segment ids."""
    return encoder_inputs(config, segments=config.type_vocab_size > 1)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_logits_match_and_checkpoints_round_trip(model_type, head, tmp_root, tmp_path):
    reference, path = torch_checkpoint(model_type, head, tmp_root)
    config = bert.BertConfig.from_hf(reference.config)
    model = HEADS[head](config)
    assert model.hf_architecture == PREFIX[model_type] + head
    params = hf_io.load_pretrained(path, param_shapes(model), model_type=model_type)
    apply = jax.jit(model.apply)
    ids, mask, types = inputs(config)
    np.testing.assert_allclose(apply({"params": params}, ids, mask, types), torch_logits(reference, ids, mask, types),
                               atol=1e-5, rtol=1e-5)

    # Our save must load in PyTorch cleanly, with the keys of theirs, and compute what we compute.
    params, loaded = round_trip(model, params, reference.config, tmp_path, path)
    np.testing.assert_allclose(apply({"params": params}, ids, mask, types), torch_logits(loaded, ids, mask, types),
                               atol=1e-5, rtol=1e-5)


def test_pytorch_bin_checkpoint(tmp_root, tmp_path):
    reference, path = torch_checkpoint("roberta", "ForMaskedLM", tmp_root)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")  # old format, tied decoder copies included
    template = param_shapes(bert.BertForMaskedLM(bert.BertConfig.from_hf(reference.config)))
    from_bin = hf_io.load_pretrained(str(tmp_path), template, model_type="roberta")
    from_safetensors = hf_io.load_pretrained(path, template, model_type="roberta")
    for x, y in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(x, y)


def test_other_family_or_size_is_refused(tmp_root):
    _, bert_path = torch_checkpoint("bert", "ForMaskedLM", tmp_root)
    roberta = bert.BertForMaskedLM(bert.BertConfig.from_hf(hf_config("roberta")))
    template = param_shapes(roberta)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*roberta\.embeddings.*unexpected key\(s\): bert\."):
        hf_io.load_pretrained(bert_path, template, model_type="roberta")

    wider = bert.BertForMaskedLM(bert.BertConfig.from_hf(hf_config("bert", hidden_size=48)))
    template = param_shapes(wider)
    with pytest.raises(ValueError, match=r"shape mismatch\(es\): bert\.embeddings\.LayerNorm\.bias: expected "
                                         r"\(48,\), found \(32,\)"):
        hf_io.load_pretrained(bert_path, template, model_type="bert")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_mlm_checkpoint_into_classifier_needs_a_fresh_head(model_type, tmp_root):
    mlm, path = torch_checkpoint(model_type, "ForMaskedLM", tmp_root)
    classifier = bert.BertForSequenceClassification(bert.BertConfig.from_hf(mlm.config))
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(cls|lm_head)\."):
        hf_io.load_pretrained(path, template, model_type=model_type)
    params = hf_io.load_pretrained(path, template, model_type=model_type, fresh=bert.FAMILY.hf.classifier_head,
                                   drop=bert.FAMILY.hf.pretraining_heads)
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    body = hf_io.params_to_state_dict({model_type: params[model_type]}, scanned=bert.FAMILY.hf.scanned)
    for key, value in body.items():
        if ".pooler." not in key:
            np.testing.assert_array_equal(value, mlm.state_dict()[key].numpy(), err_msg=key)

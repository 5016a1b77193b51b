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
from safetensors.numpy import load_file  # noqa: E402

from flaxtrain import hf_export, hf_io  # noqa: E402
from flaxtrain.models import bert  # noqa: E402

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


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


def inputs(config, seed=0):
    """Random ids with right padding (pads hold pad_token_id, as tokenizers write) and, for BERT, segment ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 5:], mask[2, 2:] = 0, 0
    ids[mask == 0] = config.pad_token_id
    types = (rng.integers(0, 2, ids.shape) * mask) if config.type_vocab_size > 1 else np.zeros_like(ids)
    return ids, mask, types


def torch_logits(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).logits.numpy()


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_logits_match_and_checkpoints_round_trip(model_type, head, tmp_root, tmp_path):
    reference, path = torch_checkpoint(model_type, head, tmp_root)
    config = bert.BertConfig.from_hf(reference.config)
    model = HEADS[head](config)
    assert model.hf_architecture == PREFIX[model_type] + head
    template = jax.eval_shape(functools.partial(bert.init_params, model), jax.random.key(0))
    params = hf_io.load_pretrained(path, template, model_type=model_type)
    apply = jax.jit(model.apply)
    ids, mask, types = inputs(config)
    np.testing.assert_allclose(apply({"params": params}, ids, mask, types), torch_logits(reference, ids, mask, types),
                               atol=1e-5, rtol=1e-5)

    # Our save must load in PyTorch cleanly and compute what we compute; perturb the params so that the check does
    # not depend on the load path above.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), params)
    hf_export.save_pretrained(str(tmp_path), params, reference.config, architecture=model.hf_architecture)
    assert load_file(str(tmp_path / "model.safetensors")).keys() == load_file(f"{path}/model.safetensors").keys()
    loaded, info = getattr(transformers, model.hf_architecture).from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    np.testing.assert_allclose(apply({"params": params}, ids, mask, types),
                               torch_logits(loaded.eval(), ids, mask, types), atol=1e-5, rtol=1e-5)


def test_pytorch_bin_checkpoint(tmp_root, tmp_path):
    reference, path = torch_checkpoint("roberta", "ForMaskedLM", tmp_root)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")  # old format, tied decoder copies included
    template = jax.eval_shape(functools.partial(bert.init_params, bert.BertForMaskedLM(
        bert.BertConfig.from_hf(reference.config))), jax.random.key(0))
    from_bin = hf_io.load_pretrained(str(tmp_path), template, model_type="roberta")
    from_safetensors = hf_io.load_pretrained(path, template, model_type="roberta")
    for x, y in zip(jax.tree.leaves(from_bin), jax.tree.leaves(from_safetensors)):
        np.testing.assert_array_equal(x, y)


def test_other_family_or_size_is_refused(tmp_root):
    _, bert_path = torch_checkpoint("bert", "ForMaskedLM", tmp_root)
    roberta = bert.BertForMaskedLM(bert.BertConfig.from_hf(hf_config("roberta")))
    template = jax.eval_shape(functools.partial(bert.init_params, roberta), jax.random.key(0))
    with pytest.raises(ValueError, match=r"missing key\(s\):.*roberta\.embeddings.*unexpected key\(s\): bert\."):
        hf_io.load_pretrained(bert_path, template, model_type="roberta")

    wider = bert.BertForMaskedLM(bert.BertConfig.from_hf(hf_config("bert", hidden_size=48)))
    template = jax.eval_shape(functools.partial(bert.init_params, wider), jax.random.key(0))
    with pytest.raises(ValueError, match=r"shape mismatch\(es\): bert\.embeddings\.LayerNorm\.bias: expected "
                                         r"\(48,\), found \(32,\)"):
        hf_io.load_pretrained(bert_path, template, model_type="bert")


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_mlm_checkpoint_into_classifier_needs_a_fresh_head(model_type, tmp_root):
    mlm, path = torch_checkpoint(model_type, "ForMaskedLM", tmp_root)
    classifier = bert.BertForSequenceClassification(bert.BertConfig.from_hf(mlm.config))
    shapes = jax.eval_shape(functools.partial(bert.init_params, classifier), jax.random.key(0))
    template = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)  # stands in for init'd params
    with pytest.raises(ValueError, match=r"missing key\(s\):.*classifier\..*unexpected key\(s\):.*(cls|lm_head)\."):
        hf_io.load_pretrained(path, template, model_type=model_type)
    params = hf_io.load_pretrained(path, template, model_type=model_type, fresh=bert.FAMILY.hf.classifier_head,
                                   drop=bert.FAMILY.hf.pretraining_heads)
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classifier"]))
    body = hf_io.params_to_state_dict({model_type: params[model_type]}, scanned=bert.FAMILY.hf.scanned)
    for key, value in body.items():
        if ".pooler." not in key:
            np.testing.assert_array_equal(value, mlm.state_dict()[key].numpy(), err_msg=key)

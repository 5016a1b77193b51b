"""BART and mBART as sequence classifiers (run_flax_glue.py) and as masked LMs (run_mlm_flax.py) against
transformers' PyTorch models: classifier logits on padded batches, checkpoints both ways, a conditional-generation
checkpoint under a fresh head; the masked-LM loss equal to transformers' on the same batch, and a tiny BART that
learns in run_mlm_flax.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from flaxtrain import hf_io, models, training  # noqa: E402
from flaxtrain.models import bart  # noqa: E402
from tests import tiny  # noqa: E402
from tests.parity import fresh_template, jit, param_shapes, round_trip, torch_logits  # noqa: E402
from tests.test_bart_parity import randomize_  # noqa: E402

CLASSIFIERS = {"bart": "BartForSequenceClassification", "mbart": "MBartForSequenceClassification"}


def hf_config(model_type, **overrides):
    return transformers.AutoConfig.for_model(
        model_type, vocab_size=99, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=20,
        scale_embedding=model_type == "mbart", init_std=0.2, **overrides)


def randomized(cls, config):
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        if not hasattr(model, "final_logits_bias"):  # (randomize_ sets it too)
            model.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size), persistent=False)
        randomize_(model)
    return model.eval()


def classifier_inputs(seed=0):
    """[3, 9] ids, each row with two eos tokens (2), as sentence pairs have (transformers requires the same count in
    every row): row 0 full, row 1 right-padded, row 2 left-padded; pads hold pad_token_id 1."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(3, 99, (3, 9)), np.ones((3, 9), np.int64)
    mask[1, 6:], mask[2, :3] = 0, 0
    ids[0, [3, 8]], ids[1, [2, 5]], ids[2, [5, 8]] = 2, 2, 2
    return np.where(mask == 1, ids, 1), mask


@pytest.mark.parametrize("model_type", list(CLASSIFIERS))
def test_classifier_logits_match_and_checkpoints_round_trip(model_type, tmp_path):
    reference = randomized(getattr(transformers, CLASSIFIERS[model_type]), hf_config(model_type, num_labels=3))
    reference.save_pretrained(tmp_path / "theirs")
    family, model = models.create(reference.config, "SequenceClassification")
    assert family is bart.FAMILY and model.hf_architecture == CLASSIFIERS[model_type]
    params = hf_io.load_pretrained(str(tmp_path / "theirs"), param_shapes(model), model_type=model_type)
    apply = jit(model.apply)
    ids, mask = classifier_inputs()
    logits = apply({"params": params}, ids, mask)
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(logits, torch_logits(reference, ids, mask), atol=1e-5, rtol=1e-5)

    params, loaded = round_trip(model, params, reference.config, tmp_path / "ours",
                                auto=transformers.AutoModelForSequenceClassification)
    np.testing.assert_allclose(apply({"params": params}, ids, mask), torch_logits(loaded, ids, mask),
                               atol=1e-5, rtol=1e-5)


def test_classifier_from_a_conditional_generation_checkpoint_gets_a_fresh_head(tmp_path):
    """A BartForConditionalGeneration checkpoint under run_flax_glue.py's rules: the body loads, its
    final_logits_bias is left out, classification_head keeps the template's (fresh) values; without the rules the
    head is missing and final_logits_bias unexpected."""
    pretrained = randomized(transformers.BartForConditionalGeneration, hf_config("bart"))
    pretrained.save_pretrained(tmp_path)
    family, classifier = models.create(hf_config("bart", num_labels=3), "SequenceClassification")
    template = fresh_template(classifier)
    with pytest.raises(ValueError, match=r"missing key\(s\): classification_head.*unexpected key\(s\): final_logits"):
        hf_io.load_pretrained(str(tmp_path), template, model_type="bart")
    params = hf_io.load_pretrained(str(tmp_path), template, model_type="bart", fresh=family.hf.classifier_head,
                                   drop=family.hf.pretraining_heads)
    assert set(params) == {"model", "classification_head"}
    assert all((x == 0.5).all() for x in jax.tree.leaves(params["classification_head"]))
    body = hf_io.params_to_state_dict({"model": params["model"]}, scanned=family.hf.scanned)
    theirs = {k: v.numpy() for k, v in pretrained.state_dict().items() if k.startswith("model.")}
    assert body.keys() <= theirs.keys()
    for name, value in body.items():
        np.testing.assert_array_equal(value, theirs[name], err_msg=name)


def masked_batch(vocab_size, mask_id, seed=0):
    """Original ids [4, 12] (row 2 right-padded), 15% of the real non-special tokens replaced by mask_id;
    (input_ids, attention_mask, positions [4, K], labels, weights) in run_mlm_flax.py's layout."""
    rng = np.random.default_rng(seed)
    ids, mask = rng.integers(4, vocab_size - 1, (4, 12)), np.ones((4, 12), np.int64)
    ids[:, 0], ids[:, -1] = 0, 2
    mask[2, 8:] = 0
    ids[2, 7] = 2
    ids = np.where(mask == 1, ids, 1)
    chosen = (rng.random(ids.shape) < 0.25) & (ids > 3)
    positions = np.argsort(~chosen, axis=1, kind="stable")[:, :5]
    weights = np.take_along_axis(chosen, positions, 1).astype(np.float32)
    return (np.where(chosen, mask_id, ids), mask, positions, np.take_along_axis(ids, positions, 1), weights)


@pytest.mark.parametrize("model_type", ["bart", "mbart"])
def test_masked_lm_loss_equals_transformers(model_type, tmp_path):
    """transformers' conditional-generation model given only the masked input_ids (its model shifts them into the
    decoder input, mBART its own way): its cross-entropy over the masked tokens equals our MaskedLM head's loss."""
    reference = randomized(getattr(transformers, bart.HF_ARCHITECTURES[model_type]), hf_config(model_type))
    reference.save_pretrained(tmp_path)
    _, model = models.create(reference.config, "MaskedLM")
    assert model.hf_architecture == bart.HF_ARCHITECTURES[model_type]
    params = hf_io.load_pretrained(str(tmp_path), param_shapes(model), model_type=model_type)
    ids, mask, positions, labels, weights = masked_batch(99, mask_id=98)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    picked = torch.gather(logits, 1, torch.tensor(positions)[..., None].expand(-1, -1, logits.shape[-1]))
    losses = torch.nn.functional.cross_entropy(picked.transpose(1, 2), torch.tensor(labels), reduction="none")
    expected = float((losses * torch.tensor(weights)).sum() / weights.sum())

    ours = jit(model.apply)({"params": params}, ids, mask, positions=positions)
    assert ours.shape == (4, 5, 99)
    np.testing.assert_allclose(np.asarray(ours)[weights > 0], picked.numpy()[weights > 0],
                               atol=1e-5 * float(picked.abs().max()), rtol=1e-5)
    loss_sum, _, weight = training.cross_entropy_sums(ours, labels, weights)
    assert float(loss_sum / weight) == pytest.approx(expected, rel=1e-5)


def test_tiny_bart_learns_in_run_mlm_flax(tmp_path):
    """run_mlm_flax.py with a tiny BART (RoBERTa's byte-level tokenizer, which has <mask>): the training loss falls
    and the masked-token accuracy beats the untrained model's; the export is a BartForConditionalGeneration."""
    import run_mlm_flax

    train = tiny.write_corpus(tmp_path / "train.txt", lines=120, seed=0)
    valid = tiny.write_corpus(tmp_path / "valid.txt", lines=20, seed=1)
    model_dir = tiny.make_bart(tmp_path / "model", train)
    flags = [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model_dir}",
             f"--tokenizer_name={model_dir}", "--max_seq_length=32", "--learning_rate=3e-3", "--warmup_steps=5",
             "--max_steps=40", "--logging_steps=10", "--save_steps=1000", "--eval_steps=1000",
             "--per_device_train_batch_size=16", "--per_device_eval_batch_size=16"]
    run_mlm_flax.main([f"--output_dir={tmp_path / 'untrained'}", "--do_eval", *flags])
    run_mlm_flax.main([f"--output_dir={tmp_path / 'run'}", *flags])
    before, after = (tiny.read_json(tmp_path / d / "eval_results.json") for d in ("untrained", "run"))
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.25, (before, after)  # about 0.5 -> 0.85
    assert after["eval_loss"] < 0.6 * before["eval_loss"], (before, after)
    losses = [loss for _, loss, _ in tiny.loss_curve(tmp_path / "run")]
    assert losses[-1] < 0.7 * losses[0], losses
    assert tiny.read_json(tmp_path / "run" / "config.json")["architectures"] == ["BartForConditionalGeneration"]

"""A smoke run of run_mlm_flax.py with a tiny XLM-RoBERTa (model_type "xlm-roberta"): it learns, and exports an
XLMRobertaForMaskedLM that transformers loads with every key in place and the same logits."""

import json

import numpy as np
import pytest

import run_mlm_flax
from tests import tiny


def test_xlm_roberta_learns_and_exports_what_pytorch_loads(tmp_path):
    train = tiny.write_corpus(tmp_path / "train.txt", seed=0)
    valid = tiny.write_corpus(tmp_path / "valid.txt", lines=20, seed=1)
    model_dir = tiny.make_roberta(tmp_path / "model", train)
    # The same tiny model under XLM-RoBERTa's model_type: its config is RoBERTa's, its classes XLMRoberta*.
    with open(tmp_path / "model/config.json") as f:
        config = json.load(f)
    config.update(model_type="xlm-roberta", architectures=None)
    with open(tmp_path / "model/config.json", "w") as f:
        json.dump(config, f)

    out = tmp_path / "run"
    run_mlm_flax.main([f"--output_dir={out}", f"--train_file={train}", f"--validation_file={valid}",
                       f"--config_name={model_dir}", f"--tokenizer_name={model_dir}", "--max_seq_length=32",
                       "--per_device_train_batch_size=16", "--learning_rate=3e-3", "--warmup_steps=10",
                       "--max_steps=100", "--logging_steps=10", "--eval_steps=100", "--save_steps=100",
                       "--weight_decay=0.01", "--adam_beta2=0.98"])
    results = tiny.read_json(out / "all_results.json")
    losses = [r["train/loss"] for r in tiny.read_history(out) if "train/loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] / 2.5, losses
    assert results["eval_accuracy"] > 0.6, results  # untrained: about 0 (tests/test_run_mlm.py)
    saved = tiny.read_json(out / "config.json")
    assert (saved["model_type"], saved["architectures"]) == ("xlm-roberta", ["XLMRobertaForMaskedLM"])

    torch = pytest.importorskip("torch")
    import jax
    from transformers import AutoModelForMaskedLM

    from flaxtrain import hf_io, pretrained
    from flaxtrain.models import create

    torch_model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(torch_model).__name__ == "XLMRobertaForMaskedLM" and not any(info.values()), info
    family, model = create(pretrained.AutoConfig.from_pretrained(out), "MaskedLM")
    template = jax.eval_shape(lambda: family.init_params(model, jax.random.key(0, impl="rbg")))
    params = hf_io.load_pretrained(str(out), template, model_type="xlm-roberta")
    ids = np.array([[0, 283, 225, 289, 2, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = torch_model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4)

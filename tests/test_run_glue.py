"""Smoke runs of run_flax_glue.py on a tiny learnable sentence-pair task: RoBERTa learns it and predicts named labels
that PyTorch reproduces from the export, keeps the best model and resumes exactly; DistilBERT learns it on 8 devices,
which evaluate every example once; ALBERT learns it and exports a classifier PyTorch loads whole; ELECTRA does
regression; a body our MLM script pretrained is fine-tuned."""

import csv

import numpy as np
import pytest

import run_flax_glue
from tests import tiny

FLAGS = ["--max_seq_length=32", "--learning_rate=3e-3", "--warmup_steps=10", "--max_steps=100", "--logging_steps=20",
         "--eval_steps=40", "--save_steps=40", "--per_device_train_batch_size=16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("glue")
    model = tiny.make_roberta(work / "model", tiny.write_corpus(work / "corpus.txt"))
    tiny.write_pairs(work / "train.csv", 600, seed=0)
    tiny.write_pairs(work / "valid.csv", 90, seed=1)
    test_truth = tiny.write_pairs(work / "test.csv", 37, seed=2, labelled=False)
    files = [f"--train_file={work / 'train.csv'}", f"--validation_file={work / 'valid.csv'}",
             f"--test_file={work / 'test.csv'}"]
    return dict(work=work, model=model, files=files, test_truth=test_truth,
                model_flags=[f"--config_name={model}", f"--tokenizer_name={model}"])


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """One 1-device run: train, evaluate, predict, keeping the best model."""
    out = tmp_path_factory.mktemp("glue-run") / "run"
    run_flax_glue.main([f"--output_dir={out}", "--do_train", "--do_eval", "--do_predict", "--load_best_model_at_end",
                        *setup["files"], *setup["model_flags"], *FLAGS])
    return out


def other_family(setup, model_dir, model_type):
    """Model flags of a tiny ELECTRA, ALBERT (one shared layer, embeddings narrower than the hidden size) or
    DistilBERT config next to the fixture's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    sizes = (dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64) if model_type == "distilbert" else
             dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))
    if model_type == "albert":
        sizes.update(bos_token_id=0, eos_token_id=2)
    AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=64, initializer_range=0.1,
                         pad_token_id=tokenizer.pad_token_id, **sizes).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return [f"--config_name={model_dir}", f"--tokenizer_name={model_dir}"]


def read_predictions(path):
    with open(path) as f:
        header, *lines = f.read().splitlines()
    assert header == "index\tprediction"
    assert [int(line.split("\t")[0]) for line in lines] == list(range(len(lines)))
    return [line.split("\t")[1] for line in lines]


def test_learns_and_predicts_named_labels(setup, trained, tmp_path):
    untrained = tmp_path / "untrained"
    run_flax_glue.main([f"--output_dir={untrained}", "--do_eval", *setup["files"], *setup["model_flags"], *FLAGS])
    before = tiny.read_json(untrained / "eval_results.json")
    after = tiny.read_json(trained / "eval_results.json")
    assert before["eval_accuracy"] < 0.6 and after["eval_accuracy"] > 0.95, (before, after)
    assert after["eval_loss"] < before["eval_loss"] / 5 and after["eval_samples"] == 90
    assert 0.95 < after["eval_f1"] <= 1  # macro F1 for data of your own with 3 labels

    predictions = read_predictions(trained / "predict_results.txt")
    assert len(predictions) == len(setup["test_truth"])
    assert np.mean(np.array(predictions) == np.array(setup["test_truth"])) > 0.95
    assert not (trained / "test_results.json").exists(), "an unlabelled test set has no metrics"

    config = tiny.read_json(trained / "config.json")
    assert config["id2label"] == {"0": "cold", "1": "mild", "2": "warm"} and config["label2id"]["warm"] == 2
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    for name in ("model.safetensors", "tokenizer.json", "train_results.json", "all_results.json"):
        assert (trained / name).is_file(), name


def test_keeps_the_best_evaluation(trained):
    evals = {r["step"]: r["eval/accuracy"] for r in tiny.read_history(trained) if "eval/accuracy" in r}
    assert sorted(evals) == [40, 80, 100]
    best = tiny.read_json(trained / "best_model" / "best.json")
    assert best["value"] == max(evals.values()) and evals[best["step"]] == best["value"]
    assert best["step"] < 100, "the best is not the last evaluation, so the final model is restored"
    results = tiny.read_json(trained / "eval_results.json")
    assert results["eval_best_step"] == best["step"] and results["eval_accuracy"] == best["value"]
    import orbax.checkpoint as ocp
    import safetensors.numpy

    final = safetensors.numpy.load_file(trained / "model.safetensors")
    kept = ocp.StandardCheckpointer().restore(trained / "best_model" / str(best["step"]) / "default")
    np.testing.assert_array_equal(final["classifier.out_proj.weight"], kept["classifier"]["out_proj"]["kernel"].T)
    np.testing.assert_array_equal(final["roberta.encoder.layer.1.output.dense.weight"],
                                  kept["roberta"]["encoder"]["layer"]["output"]["dense"]["kernel"][1].T)


def test_exported_classifier_predicts_the_same_labels_in_pytorch(setup, trained):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    with open(setup["work"] / "test.csv") as f:
        rows = list(csv.DictReader(f))
    inputs = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        ids = model(**inputs).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in ids] == read_predictions(trained / "predict_results.txt")


def test_distilbert_on_eight_devices_learns_the_same_on_every_mesh_and_counts_every_example_once(setup, tmp_path):
    layouts = tiny.sharded_runs("run_flax_glue.py", [
        *setup["files"], *FLAGS, *other_family(setup, tmp_path / "distilbert", "distilbert"),
        "--per_device_train_batch_size=2", "--per_device_eval_batch_size=4", "--do_train", "--do_eval",
        "--do_predict"], tmp_path)
    out = tmp_path / "fsdp8"
    tiny.assert_split(layouts["fsdp8"], 8)
    tiny.assert_split(layouts["fsdp4_tp2"], 4)
    for mesh in ("fsdp8", "fsdp4_tp2"):
        tiny.assert_same_training(tmp_path / mesh, tmp_path / "fsdp1")
        assert read_predictions(tmp_path / mesh / "predict_results.txt") == \
            read_predictions(tmp_path / "fsdp1" / "predict_results.txt")
    assert tiny.read_json(out / "config.json")["architectures"] == ["DistilBertForSequenceClassification"]
    eight = tiny.read_json(out / "eval_results.json")
    assert eight["eval_accuracy"] > 0.95 and eight["eval_samples"] == 90
    assert len(read_predictions(out / "predict_results.txt")) == len(setup["test_truth"])
    # 90 rows in batches of 32: the last one padded. The same model on one device gives the same numbers.
    one = tmp_path / "one"
    run_flax_glue.main([f"--output_dir={one}", "--do_eval", "--do_predict", f"--model_name_or_path={out}",
                        *setup["files"], "--max_seq_length=32", "--per_device_eval_batch_size=7"])
    single = tiny.read_json(one / "eval_results.json")
    assert single["eval_accuracy"] == eight["eval_accuracy"]
    assert single["eval_loss"] == pytest.approx(eight["eval_loss"], rel=1e-5)
    assert read_predictions(one / "predict_results.txt") == read_predictions(out / "predict_results.txt")


def test_albert_learns_the_pair_task_and_exports_what_pytorch_loads(setup, tmp_path):
    out = tmp_path / "run"
    run_flax_glue.main([f"--output_dir={out}", "--do_train", "--do_eval", *setup["files"][:2],
                        *other_family(setup, tmp_path / "albert", "albert"), "--max_seq_length=32",
                        "--learning_rate=3e-3", "--warmup_steps=10", "--max_steps=100", "--logging_steps=20",
                        "--eval_steps=100", "--save_steps=100", "--per_device_train_batch_size=16"])

    results = tiny.read_json(out / "eval_results.json")
    assert results["eval_accuracy"] > 0.9 and results["eval_samples"] == 90, results
    losses = [loss for _, loss, _ in tiny.loss_curve(out)]
    assert losses[-1] < losses[0] / 5, losses
    assert tiny.read_json(out / "config.json")["architectures"] == ["AlbertForSequenceClassification"]

    from transformers import AlbertForSequenceClassification

    _, info = AlbertForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}


def test_electra_regression_with_a_task_name_on_local_files(setup, tmp_path):
    files = []
    for split, rows, seed in (("train", 600, 3), ("validation", 90, 4)):
        tiny.write_pairs(tmp_path / f"{split}.csv", rows, seed, regression=True)
        files.append(f"--{split}_file={tmp_path / f'{split}.csv'}")
    out = tmp_path / "stsb"
    run_flax_glue.main([f"--output_dir={out}", "--task_name=STSB", *files, *FLAGS, "--max_steps=200",
                        *other_family(setup, tmp_path / "electra", "electra"), "--load_best_model_at_end"])
    results = tiny.read_json(out / "eval_results.json")
    assert results["eval_pearson"] > 0.9 and results["eval_spearmanr"] > 0.9, results
    best = tiny.read_json(out / "best_model" / "best.json")
    assert best["metric"] == "eval_pearson"  # the task's main metric picks the best model
    config = tiny.read_json(out / "config.json")
    assert len(config["id2label"]) == 1 and config["problem_type"] == "regression"
    assert config["architectures"] == ["ElectraForSequenceClassification"]


def test_fine_tunes_a_body_our_mlm_script_pretrained(setup, tmp_path):
    import safetensors.numpy

    import run_mlm_flax

    mlm = tmp_path / "mlm"
    run_mlm_flax.main([f"--output_dir={mlm}", f"--train_file={setup['work'] / 'corpus.txt'}", *setup["model_flags"],
                       "--max_seq_length=32", "--max_steps=5", "--do_train"])
    out = tmp_path / "cls"
    run_flax_glue.main([f"--output_dir={out}", f"--model_name_or_path={mlm}", *setup["files"], "--do_train",
                        "--max_seq_length=32", "--max_steps=2", "--learning_rate=1e-7", "--save_steps=2"])
    pretrained = safetensors.numpy.load_file(mlm / "model.safetensors")
    tuned = safetensors.numpy.load_file(out / "model.safetensors")
    body = {k for k in pretrained if k.startswith("roberta.")}
    assert body and body < tuned.keys()
    assert {k for k in tuned.keys() - body} == {"classifier.dense.weight", "classifier.dense.bias",
                                                "classifier.out_proj.weight", "classifier.out_proj.bias"}
    for key in body:  # loaded, then barely moved by two tiny steps
        np.testing.assert_allclose(tuned[key], pretrained[key], atol=1e-4, err_msg=key)
    assert tuned["classifier.out_proj.weight"].shape == (3, 32)


def test_sigterm_then_the_same_command_resumes_exactly_with_its_best_model(setup, trained):
    """From the working directory with relative paths, as the README runs it: SIGTERM between two saves, after a
    best evaluation; the same command again."""
    relative = ["--train_file=train.csv", "--validation_file=valid.csv", "--test_file=test.csv", "--config_name=model",
                "--tokenizer_name=model"]
    args = ["--output_dir=stopped", "--do_train", "--do_eval", "--do_predict", "--load_best_model_at_end", *relative,
            *FLAGS]
    stopped = tiny.run_script("run_flax_glue.py", args, devices=1, cwd=setup["work"], signal={"SIGNAL_AT_STEP": 57},
                              returncode=143)
    out = setup["work"] / "stopped"
    tiny.stopped_by_signal(stopped, out, step=57)
    tiny.run_script("run_flax_glue.py", args, devices=1, cwd=setup["work"])
    np.testing.assert_allclose(tiny.loss_curve(out), tiny.loss_curve(trained), rtol=1e-5)
    whole, resumed = (tiny.read_json(d / "eval_results.json") for d in (trained, out))
    assert resumed["eval_best_step"] == whole["eval_best_step"]
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)
    assert read_predictions(out / "predict_results.txt") == read_predictions(trained / "predict_results.txt")

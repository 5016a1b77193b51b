"""run_flax_glue.py refuses bad input with a message naming the problem, before training and before it writes
anything to output_dir."""

import csv

import pytest

import run_flax_glue
from tests import tiny


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("glue-bad")
    return tiny.make_roberta(work / "model", tiny.write_corpus(work / "corpus.txt", lines=50))


def fails(tmp_path, model, args, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run_flax_glue.main([f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}",
                            "--max_seq_length=16", "--max_steps=2", *args])
    assert not out.exists()


def test_validation_labels_the_training_data_never_had(tmp_path, model):
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], [["a b", "yes"], ["c d", "no"]] * 8)
    valid = write_csv(tmp_path / "valid.csv", ["sentence", "label"], [["a b", "yes"], ["c d", "maybe"]])
    fails(tmp_path, model, [f"--train_file={train}", f"--validation_file={valid}"],
          r"validation data has labels that the training data does not have: maybe \(known: no, yes\)")


def test_missing_text_column(tmp_path, model):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [["a b", "yes"], ["c d", "no"]] * 8)
    fails(tmp_path, model, [f"--train_file={train}", "--validation_split_percentage=25"],
          r"no column 'sentence'; its columns are text, label\. Name the text column\(s\) with --text_column_name")


def test_missing_label_column(tmp_path, model):
    train = write_csv(tmp_path / "train.csv", ["sentence1", "sentence2", "target"], [["a", "b", "yes"]] * 8)
    fails(tmp_path, model, [f"--train_file={train}", "--validation_split_percentage=25"],
          r"no column 'label'; its columns are sentence1, sentence2, target")


def test_unknown_task_lists_the_tasks(tmp_path, model):
    fails(tmp_path, model, ["--task_name=sst5"],
          "--task_name=sst5: not a GLUE task; the tasks are cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb, wnli")


def test_unsupported_model_family(tmp_path):
    decoder = tiny.make_decoder(tmp_path / "gpt2", tiny.write_corpus(tmp_path / "corpus.txt", lines=50))
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], [["a b", "yes"], ["c d", "no"]] * 8)
    fails(tmp_path, decoder, [f"--train_file={train}"],
          r"model_type 'gpt2' is not supported for this task; supported model types: albert, bart, bert, .*roberta")


def test_predict_without_a_test_set(tmp_path, model):
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], [["a b", "yes"], ["c d", "no"]] * 8)
    fails(tmp_path, model, [f"--train_file={train}", "--do_predict"], r"--do_predict\) needs --test_file")


def test_best_model_needs_training_and_evaluation(tmp_path, model):
    fails(tmp_path, model, ["--do_train", "--load_best_model_at_end"],
          "--load_best_model_at_end needs --do_train and --do_eval")

"""Bad input to run_summarization_flax.py fails before any model is built, names what is wrong (the columns
found, the missing test set, the model's positions), and leaves no output directory behind; what is only suspect
(a T5 without --source_prefix, some empty documents) is a warning."""

import json
import logging

import pytest

import run_summarization_flax
from tests import tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad")
    train = tiny.write_summaries(work / "train.json", 40, 0)
    corpus = tiny.write_text(work / "corpus.txt", train)
    return dict(work=work, train=train, t5=tiny.make_word_t5(work / "t5", corpus),
                bart=tiny.make_bart(work / "bart", corpus))


@pytest.fixture
def warnings_logged():
    """The script's warnings (its logger keeps this handler when setup_logging resets the root logger's)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("run_summarization_flax")
    logger.addHandler(handler)
    yield lambda: [r.getMessage() for r in records]
    logger.removeHandler(handler)


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def fails(tmp_path, model, *flags, match, error=ValueError):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_summarization_flax.main([f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}",
                                     "--max_source_length=12", "--max_target_length=10", "--max_steps=2", *flags])
    assert not out.exists(), "a failed start must not leave an output directory"


def test_missing_text_column_names_the_columns_found(setup, tmp_path):
    train = write_rows(tmp_path / "train.json", [{"article": "pine pine", "highlights": "pine"}] * 4)
    fails(tmp_path, setup["t5"], f"--train_file={train}", "--text_column=document", "--do_train",
          match=r"--text_column='document' is not a column of the train data; its columns are: article \(string\), "
                r"highlights \(string\)")


def test_missing_summary_column_in_validation(setup, tmp_path):
    valid = write_rows(tmp_path / "valid.json", [{"document": "pine pine"}] * 4)
    fails(tmp_path, setup["t5"], f"--train_file={setup['train']}", f"--validation_file={valid}",
          match=r"--summary_column='summary' is not a column of the validation data; its columns are: document")


def test_one_column_is_not_a_summarization_dataset(setup, tmp_path):
    train = write_rows(tmp_path / "train.json", [{"text": "pine pine"}] * 4)
    fails(tmp_path, setup["t5"], f"--train_file={train}", "--do_train", match=r"only the column\(s\) text")


def test_do_predict_without_a_test_set(setup, tmp_path):
    fails(tmp_path, setup["t5"], f"--train_file={setup['train']}", "--do_train", "--do_predict",
          match="--do_predict needs a test set: give --test_file")


def test_t5_without_source_prefix_is_warned_about(setup, tmp_path, warnings_logged):
    train = write_rows(tmp_path / "train.json", [{"text": "pine pine"}] * 4)
    fails(tmp_path, setup["t5"], f"--train_file={train}", "--do_train", match="only the column")
    assert any("--source_prefix" in message for message in warnings_logged())
    fails(tmp_path, setup["t5"], f"--train_file={train}", "--do_train", "--source_prefix=summarize: ",
          match="only the column")
    assert sum("--source_prefix" in message for message in warnings_logged()) == 1


def test_empty_documents_are_dropped_with_a_count_and_all_empty_is_an_error(setup, tmp_path, warnings_logged):
    rows = [{"document": "pine pine moss", "summary": "The pine grows."}] * 8
    train = write_rows(tmp_path / "train.json", rows + [{"document": " \n", "summary": "x"},
                                                        {"document": None, "summary": "x"},
                                                        {"document": "pine", "summary": ""}])
    valid = write_rows(tmp_path / "valid.json", [{"document": "", "summary": "The pine grows."}] * 3)
    fails(tmp_path, setup["t5"], f"--train_file={train}", f"--validation_file={valid}",
          match=r"Every one of the 3 validation examples has an empty document \('document'\) or summary")
    assert any("Dropped 3 of the 11 train examples" in message for message in warnings_logged()), warnings_logged()


def test_source_longer_than_bart_positions(setup, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--max_source_length=64 is more than the model's 32 positions"):
        run_summarization_flax.main([f"--output_dir={out}", f"--config_name={setup['bart']}",
                                     f"--tokenizer_name={setup['bart']}", f"--train_file={setup['train']}",
                                     "--max_source_length=64", "--max_target_length=10"])
    assert not out.exists()


@pytest.mark.parametrize("flag, match", [("--label_smoothing_factor=1.0", "--label_smoothing_factor must be in"),
                                         ("--max_target_length=0", "--max_target_length must be at least 1")])
def test_bad_numbers(setup, tmp_path, flag, match):
    fails(tmp_path, setup["t5"], f"--train_file={setup['train']}", flag, match=match)

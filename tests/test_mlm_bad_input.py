"""Bad input to run_mlm_flax.py fails fast, names the flag or file, and leaves no output directory behind."""

import os

import pytest

import run_mlm_flax
from tests import tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad")
    return tiny.make_roberta(work / "model", tiny.write_corpus(work / "train.txt"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny.write_corpus(tmp_path_factory.mktemp("corpus") / "train.txt")


def fails(tmp_path, model, *flags, error=ValueError, match):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_mlm_flax.main([f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}",
                           "--max_seq_length=32", "--max_steps=2", *flags])
    assert not out.exists(), "a failed start must not leave an output directory"


def test_missing_train_file(tmp_path, model):
    fails(tmp_path, model, f"--train_file={tmp_path}/nope.txt", error=FileNotFoundError,
          match=r"--train_file=.*nope\.txt: no such file")


def test_empty_train_file(tmp_path, model):
    (tmp_path / "empty.txt").write_text("")
    fails(tmp_path, model, f"--train_file={tmp_path}/empty.txt", match=r"--train_file=.*empty\.txt: the file is empty")


def test_unsupported_file_type(tmp_path, model):
    (tmp_path / "data.xlsx").write_text("x")
    fails(tmp_path, model, f"--train_file={tmp_path}/data.xlsx", match="unsupported file type")


def test_a_parquet_file_that_is_not_one(tmp_path, model):
    (tmp_path / "data.parquet").write_text("x")
    fails(tmp_path, model, f"--train_file={tmp_path}/data.parquet",
          match=r"--train_file=.*data\.parquet: not a parquet file pyarrow can read")


def test_csv_without_a_text_column(tmp_path, model):
    (tmp_path / "data.csv").write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in range(50)))
    fails(tmp_path, model, f"--train_file={tmp_path}/data.csv", match=r"no text column.*id \(int64\), label")


def test_sequence_longer_than_the_model(tmp_path, model, corpus):
    fails(tmp_path, model, f"--train_file={corpus}", "--max_seq_length=100",
          match="--max_seq_length=100 is more than the model's 64 positions")


def test_tokenizer_without_mask_token(tmp_path, model, corpus):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.mask_token = None
    tokenizer.save_pretrained(tmp_path / "no_mask")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="has no mask token"):
        run_mlm_flax.main([f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={tmp_path}/no_mask",
                           f"--train_file={corpus}", "--max_seq_length=32"])
    assert not out.exists()


def test_existing_output_dir_without_overwrite(tmp_path, model, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty.*--overwrite_output_dir"):
        run_mlm_flax.main([f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}",
                           f"--train_file={corpus}", "--max_seq_length=32"])
    assert os.listdir(out) == ["notes.txt"]


def test_fewer_examples_than_one_global_batch(tmp_path, model, corpus):
    fails(tmp_path, model, f"--train_file={corpus}", "--max_train_samples=3", "--per_device_train_batch_size=16",
          "--do_train", match="3 examples, fewer than one global batch of 16")


def test_corpus_shorter_than_one_block(tmp_path, model):
    (tmp_path / "short.txt").write_text("amber amber\n" * 3)
    fails(tmp_path, model, f"--train_file={tmp_path}/short.txt", "--do_train",
          match="train data gives no examples: it is shorter than one block of 32 tokens")


def test_unknown_flag(tmp_path, model, corpus):
    fails(tmp_path, model, f"--train_file={corpus}", "--learning_rat=1e-3", match="--learning_rat")

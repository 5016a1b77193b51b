"""Data files that datasets, the tokenizer or the Hub client would fail on deep inside (bytes that are not UTF-8,
a malformed JSON line, only blank lines, labels that mix numbers and words, a Hub that cannot be reached) stop a
run with one line that names the flag, the file and the place, before anything is written to output_dir."""

import csv
import json
import socket

import pytest

import run_flax_glue
import run_mlm_flax
from flaxtrain import data
from flaxtrain.settings import DataSource
from tests import tiny

GOOD = [f"{tiny.WORDS[i % 25]} {tiny.WORDS[(i * 7) % 25]} amber" for i in range(40)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad-files")
    return tiny.make_roberta(work / "model", tiny.write_corpus(work / "corpus.txt", lines=50))


def fails(tmp_path, main, model, *flags, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as raised:
        main([f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}", "--max_seq_length=16",
              "--max_steps=2", *flags])
    assert "\n" not in str(raised.value)
    assert not out.exists(), "a failed start must not leave an output directory"


def json_lines(rows):
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


# Each file: the good rows, then one holding "caf\xe9" (é in Latin-1, not UTF-8).
NOT_UTF8 = {
    "txt": lambda bad: "".join(f"{t}\n" for t in GOOD).encode() + bad + b"\n",
    "csv": lambda bad: ("sentence\n" + "".join(f"{t}\n" for t in GOOD)).encode() + bad + b"\n",
    "jsonl": lambda bad: json_lines({"text": t} for t in GOOD) + b'{"text": "' + bad + b'"}\n',
    "json": lambda bad: ("[" + ",\n".join(json.dumps({"text": t}) for t in GOOD) + ',\n{"text": "').encode()
    + bad + b'"}]\n',  # one document (a list of rows), not JSON Lines
}


@pytest.mark.parametrize("kind", NOT_UTF8)
def test_bytes_that_are_not_utf8(tmp_path, model, kind):
    content = NOT_UTF8[kind](b"caf\xe9 amber")
    offset, line = content.index(b"\xe9"), content.count(b"\n")  # the last line
    (tmp_path / f"bad.{kind}").write_bytes(content)
    where = rf"not UTF-8 text: byte 0xe9 at byte offset {offset} \(line {line}\): invalid continuation byte\."
    if kind == "csv":  # as run_flax_glue's --test_file: the same check for every flag
        with open(tmp_path / "train.csv", "w", newline="") as f:
            csv.writer(f).writerows([["sentence", "label"], *([t, t.split()[0]] for t in GOOD)])
        fails(tmp_path, run_flax_glue.main, model, f"--train_file={tmp_path}/train.csv",
              f"--test_file={tmp_path}/bad.csv", "--do_predict", match=rf"^--test_file=\S*bad\.csv: {where}")
    else:
        fails(tmp_path, run_mlm_flax.main, model, f"--train_file={tmp_path}/bad.{kind}", "--do_train",
              match=rf"^--train_file=\S*bad\.{kind}: {where}")


@pytest.mark.parametrize("kind, content, where", [
    ("jsonl", json_lines({"text": t} for t in GOOD[:2]) + b'{"text": "amber" "basil"}\n' + b'{"text": "x"}\n',
     r"line 3 is not valid JSON: Expecting ',' delimiter \(column 18\)"),
    ("json", b'{\n  "text": [\n    "amber basil",\n    "cedar" "dune"\n  ]\n}\n',  # one document of columns
     r"line 4 is not valid JSON: Expecting ',' delimiter \(column 13\)"),
])
def test_malformed_json(tmp_path, model, kind, content, where):
    (tmp_path / f"bad.{kind}").write_bytes(content)
    fails(tmp_path, run_mlm_flax.main, model, f"--train_file={tmp_path}/bad.{kind}", "--do_train",
          match=rf"^--train_file=\S*bad\.{kind}: {where}\.$")

    # Without the error, the file reads as before (a .json file may be JSON Lines or one document).
    (tmp_path / "good.json").write_bytes(content.replace(b'" "', b" "))
    raw = data.load_raw_datasets(DataSource(train_file=str(tmp_path / "good.json"), validation_split_percentage=0),
                                 need_train=True, need_eval=False)
    texts = raw["train"]["text"]
    assert texts == ([["amber basil", "cedar dune"]] if kind == "json" else [*GOOD[:2], "amber basil", "x"])


def test_line_by_line_on_blank_lines(tmp_path, model):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n" * 30)
    fails(tmp_path, run_mlm_flax.main, model, f"--train_file={tmp_path}/blank.txt", "--line_by_line", "--do_train",
          match=r"^The train data gives no examples: --train_file=\S*blank\.txt has no non-blank lines "
                r"\(--line_by_line")


def test_labels_that_mix_numbers_and_words(tmp_path, model):
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["sentence", "label"], *([t, ("1", "0.5", "positive", "0")[i % 4]]
                                                        for i, t in enumerate(GOOD))])
    fails(tmp_path, run_flax_glue.main, model, f"--train_file={tmp_path}/train.csv",
          match=r"^--train_file=\S*train\.csv: the label column 'label' mixes numbers \(0, 0\.5, 1\) and words "
                r"\(positive\)")


def test_push_to_hub_with_an_unreachable_hub(tmp_path, model, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port on which, once closed, nothing listens
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline switch would refuse earlier
    corpus = tiny.write_corpus(tmp_path / "corpus.txt", lines=20)
    fails(tmp_path, run_mlm_flax.main, model, f"--train_file={corpus}", "--push_to_hub", "--hub_token=hf_unused",
          match=rf"^--push_to_hub: cannot reach the Hub at {endpoint} \(ConnectError: ")

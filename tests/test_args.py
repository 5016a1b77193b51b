"""Shared flags: original names and defaults, a .json file as the only argument, secrets kept out of files."""

import json

import pytest

from flaxtrain import resume, settings
from flaxtrain.args import DataArguments, ModelArguments, TrainingArguments, parse_args

TYPES = (ModelArguments, DataArguments, TrainingArguments)


def test_defaults_never_crash_and_no_do_flag_means_train_and_eval():
    _, _, training = parse_args(TYPES, ["--output_dir=out", "--logging_steps=7"])
    assert training.eval_steps == 7  # the original crashed on eval_steps=None
    assert training.do_train and training.do_eval and not training.do_predict
    _, _, training = parse_args(TYPES, ["--output_dir=out", "--do_eval"])
    assert training.do_eval and not training.do_train


def test_a_json_file_is_the_whole_command_line(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": "o", "learning_rate": 3e-4, "train_file": "t.txt", "do_train": True}))
    _, data, training = parse_args(TYPES, [str(path)])
    assert (training.learning_rate, data.train_file, training.do_train, training.do_eval) == (3e-4, "t.txt", True, False)


@pytest.mark.parametrize("argv, match", [
    (["--output_dir=o", "--no_such_flag=1"], "no_such_flag"),
    (["--output_dir=o", "--learning_rat=1"], "learning_rat"),  # no silent prefix matching
    (["--output_dir=o", "--per_device_train_batch_size=0"], "per_device_train_batch_size must be at least 1"),
    (["--output_dir=o", "--warmup_ratio=1.5"], "warmup_ratio"),
    (["--output_dir=o", "--learning_rate=0"], "--learning_rate must be more than 0, got 0.0"),
    (["--output_dir=o", "--learning_rate=-1e-3"], "--learning_rate must be more than 0, got -0.001"),
])
def test_bad_flags_are_errors(argv, match):
    with pytest.raises((ValueError, SystemExit), match=match):
        parse_args(TYPES, argv)


def test_tokens_stay_out_of_saved_args_and_reprs(tmp_path):
    model, data, training = parse_args(TYPES, ["--output_dir=o", "--token=hf_secret1", "--hub_token=hf_secret2"])
    run = settings.from_flags(model, data, training)
    resume.record_start(str(tmp_path), None, run.flags, run.identity)
    text = (tmp_path / "training_args.json").read_text() + repr(model) + repr(training)
    assert "hf_secret" not in text and "learning_rate" in text


def test_paths_mean_the_same_after_a_change_of_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model, data, training = parse_args(TYPES, ["--output_dir=runs/./a", "--train_file=~/corpus.txt",
                                               "--config_name=~/my-model"])
    assert training.output_dir == str(tmp_path / "runs" / "a")
    assert (data.train_file, model.config_name) == (f"{tmp_path}/home/corpus.txt", f"{tmp_path}/home/my-model")
    _, _, training = parse_args(TYPES, ["--output_dir=gs://bucket/runs/"])
    assert training.output_dir == "gs://bucket/runs"


def test_the_scripts_run_as_programs():
    """`./run_mlm_flax.py ...`, as the Flax community week's guide ran them."""
    import glob
    import os

    scripts = glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "run_*.py"))
    assert len(scripts) == 5
    for script in scripts:
        assert os.access(script, os.X_OK), script
        with open(script) as f:
            assert f.readline() == "#!/usr/bin/env python3\n", script

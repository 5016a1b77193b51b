"""--output_dir=gs://...: a run trains, is stopped (Ctrl-C), resumes and exports through a bucket (a GCS server on 127.0.0.1,
tests/gcs_server.py), and ends as the same run on a local disk; transformers loads what it exported."""

import datasets
import pytest

import run_mlm_flax
from flaxtrain import checkpoint, storage
from tests import tiny
from tests.gcs_server import gcs_bucket  # noqa: F401  (a fixture)

FLAGS = ["--train_file=train.txt", "--validation_file=valid.txt", "--config_name=model", "--tokenizer_name=model",
         "--max_seq_length=32", "--learning_rate=3e-3", "--warmup_steps=10", "--max_steps=30", "--logging_steps=10",
         "--save_steps=20", "--eval_steps=1000", "--weight_decay=0.01", "--per_device_train_batch_size=16"]


def test_train_stop_resume_and_export_through_a_bucket(tmp_path, monkeypatch, gcs_bucket):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    tiny.make_roberta("model", tiny.write_corpus("train.txt"))
    tiny.write_corpus("valid.txt", lines=20, seed=1)
    run_mlm_flax.main(["--output_dir=local", *FLAGS])

    # The data and the model's config and tokenizer come from the bucket too.
    for name in ("train.txt", "valid.txt", "model"):
        storage.put(name, f"{gcs_bucket}/{name}")
    flags = [f.replace("=", f"={gcs_bucket}/") if f.startswith(("--train", "--valid", "--config", "--tokenizer"))
             else f for f in FLAGS]
    # datasets' offline mode refuses every remote file, a bucket's too; the Hub stays off (HF_HUB_OFFLINE).
    online = {"HF_DATASETS_OFFLINE": "0"}
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    remote = f"{gcs_bucket}/runs/mlm"
    stopped = tiny.run_script("run_mlm_flax.py", [f"--output_dir={remote}", *flags], devices=1, cwd=tmp_path,
                              env=online, signal={"SIGNAL_AT_STEP": 13, "SIGNAL_NAME": "SIGINT"}, returncode=130)
    assert "SIGINT received" in stopped.stderr and "Traceback" not in stopped.stderr  # Ctrl-C
    tiny.stopped_by_signal(stopped, remote, step=13)
    resumed = tiny.run_script("run_mlm_flax.py", [f"--output_dir={remote}", *flags], devices=1, cwd=tmp_path,
                              env=online)
    assert f"Resuming from the checkpoint of step 13 in {remote}/checkpoints" in resumed.stderr
    assert checkpoint.steps(checkpoint.directory_of(remote)) == [13, 20, 30]
    names = storage.listdir(remote)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_args.json", "log_history.jsonl",
                 "all_results.json", "eval_results.json"):
        assert name in names, name
    assert any(name.startswith("events.out.tfevents") for name in names)

    copy = storage.download(remote, str(tmp_path / "copy"))
    tiny.assert_same_run(copy, "local")
    finished = tiny.read_json(tmp_path / "copy" / "all_results.json")
    run_mlm_flax.main([f"--output_dir={remote}", "--do_eval", *flags])  # the model trained in the bucket
    assert tiny.read_json(storage.download(remote, str(tmp_path / "again")) + "/eval_results.json")["eval_loss"] == \
        pytest.approx(finished["eval_loss"], rel=1e-6)
    pytest.importorskip("torch")
    from transformers import AutoModelForMaskedLM

    _, info = AutoModelForMaskedLM.from_pretrained(copy, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

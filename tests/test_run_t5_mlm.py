"""Smoke runs of run_t5_mlm_flax.py on tiny local data: T5 learns to fill corrupted spans, writes every file,
resumes exactly; bad input fails before any work."""

import os

import pytest

import run_t5_mlm_flax
from tests import tiny

FLAGS = ["--max_seq_length=32", "--learning_rate=3e-3", "--warmup_steps=5", "--max_steps=100",
         "--logging_steps=10", "--save_steps=50", "--eval_steps=50"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("t5")
    train = tiny.write_corpus(work / "train.txt")
    valid = tiny.write_corpus(work / "valid.txt", lines=20, seed=1)
    models = {"v1.0": tiny.make_t5(work / "t5", train), "v1.1": tiny.make_t5(work / "t5v11", train, gated=True)}
    return dict(work=work, train=train, models=models, data={
        k: [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={m}", f"--tokenizer_name={m}"]
        for k, m in models.items()})


def test_learns_writes_every_file_and_loads_in_pytorch(setup, tmp_path):
    untrained = tmp_path / "untrained"
    run_t5_mlm_flax.main([f"--output_dir={untrained}", "--do_eval", *setup["data"]["v1.0"], *FLAGS])
    before = tiny.read_json(untrained / "eval_results.json")

    out = tmp_path / "run"
    run_t5_mlm_flax.main([f"--output_dir={out}", "--per_device_train_batch_size=16", *setup["data"]["v1.0"], *FLAGS])
    after = tiny.read_json(out / "eval_results.json")
    assert after["eval_accuracy"] > 0.35 > before["eval_accuracy"] + 0.25, (before, after)
    assert after["eval_loss"] < before["eval_loss"] / 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_results.json", "all_results.json",
                 "log_history.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "checkpoints"), key=int) == ["50", "100"]

    torch = pytest.importorskip("torch")
    from transformers import T5ForConditionalGeneration

    model, info = T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert isinstance(model(input_ids=torch.ones((1, 4), dtype=torch.long),
                            decoder_input_ids=torch.zeros((1, 2), dtype=torch.long)).logits, torch.Tensor)


def test_t5_v1_1_learns_the_same_with_fsdp_and_tensor_parallel(setup, tmp_path):
    """On 8 devices: data parallelism, --fsdp 8 and --fsdp 4 --tensor_parallel 2 train the same T5 v1.1, every leaf
    of the state split."""
    args = ["--per_device_train_batch_size=2", "--noise_density=0.15", *setup["data"]["v1.1"], *FLAGS]
    layouts = tiny.sharded_runs("run_t5_mlm_flax.py", args, tmp_path)
    results = tiny.read_json(tmp_path / "fsdp1" / "all_results.json")
    assert results["eval_accuracy"] > 0.35, results  # untrained: below 0.1
    for mesh, ways in (("fsdp8", 8), ("fsdp4_tp2", 4)):
        tiny.assert_same_training(tmp_path / mesh, tmp_path / "fsdp1")
        tiny.assert_split(layouts[mesh], ways)


def test_stopped_twice_and_damaged_then_the_same_command_continues_exactly(setup, monkeypatch):
    """SIGTERM, and SIGTERM again while it saves; then its two newest checkpoints are damaged (a data file; the
    arrays' metadata): the same command, from the working directory with relative paths, sets them aside, resumes
    from the one before and still ends as the uninterrupted run."""
    monkeypatch.chdir(setup["work"])
    flags = ["--per_device_train_batch_size=8", "--train_file=train.txt", "--validation_file=valid.txt",
             "--config_name=t5", "--tokenizer_name=t5", *FLAGS, "--max_steps=20", "--save_steps=5",
             "--eval_steps=1000", "--logging_steps=5"]
    run_t5_mlm_flax.main(["--output_dir=whole", *flags])

    stopped = tiny.run_script("run_t5_mlm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup["work"],
                              signal={"SIGNAL_AT_STEP": 13, "SIGNAL_AGAIN": 1}, returncode=143)
    assert "SIGTERM received again: still stopping and saving; ignored" in stopped.stderr
    tiny.stopped_by_signal(stopped, setup["work"] / "run", step=13)
    steps = setup["work"] / "run" / "checkpoints"
    next((steps / "13" / "state" / "d").iterdir()).unlink()
    (steps / "10" / "state" / "_METADATA").unlink()

    resumed = tiny.run_script("run_t5_mlm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup["work"])
    assert "Resuming from the checkpoint of step 5 instead" in resumed.stderr
    assert "Traceback" not in resumed.stderr and "Event loop is closed" not in resumed.stderr, resumed.stderr[-3000:]
    assert sorted(os.listdir(steps)) == ["10", "10.damaged", "13.damaged", "15", "20", "5"]
    assert [s for s, _, _ in tiny.loss_curve("run")] == [5, 10, 15, 20]
    tiny.assert_same_run("run", "whole")


def fails(tmp_path, args, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        run_t5_mlm_flax.main([f"--output_dir={out}", "--max_steps=2", *args])
    assert not out.exists()


def test_tokenizer_without_sentinels(setup, tmp_path):
    roberta = tiny.make_roberta(tmp_path / "roberta", setup["train"])
    fails(tmp_path, [f"--train_file={setup['train']}", f"--config_name={setup['models']['v1.0']}",
                     f"--tokenizer_name={roberta}", "--max_seq_length=32"], match="extra_id")


def test_a_seq2seq_model_that_is_not_t5_like(setup, tmp_path):
    bart = tiny.make_bart(tmp_path / "bart", setup["train"])
    fails(tmp_path, [f"--train_file={setup['train']}", f"--config_name={bart}",
                     f"--tokenizer_name={setup['models']['v1.0']}", "--max_seq_length=32"],
          match="model_type 'bart' is not supported for this task; supported model types: longt5, mt5, t5")


@pytest.mark.parametrize("density", ["0", "1.5"])
def test_noise_density_outside_zero_one(setup, tmp_path, density):
    fails(tmp_path, [*setup["data"]["v1.0"], f"--noise_density={density}"], match="between 0 and 1")


def test_corpus_shorter_than_one_input_block(setup, tmp_path):
    (tmp_path / "short.txt").write_text("amber amber amber\n")
    model = setup["models"]["v1.0"]
    fails(tmp_path, [f"--train_file={tmp_path}/short.txt", f"--config_name={model}", f"--tokenizer_name={model}",
                     "--max_seq_length=32", "--do_train"], match="train data gives no chunk of 34 tokens")

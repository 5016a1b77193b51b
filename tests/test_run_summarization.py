"""Smoke runs of run_summarization_flax.py on a tiny summarization task made here: T5 (1 device), BART (8 devices)
and Pegasus learn it, ROUGE rises far above the untrained model's, every file is written, summaries come out one per
test example in order, and 8 devices count every example exactly once (the same test metrics as 1 device)."""

import json
import os
import shutil

import numpy as np
import pytest

import run_summarization_flax
from flaxtrain import seq2seq_batches
from tests import tiny

LENGTHS = ["--max_source_length=12", "--max_target_length=10"]
TRAIN = ["--learning_rate=5e-3", "--warmup_steps=10", "--max_steps=80", "--logging_steps=20", "--eval_steps=1000",
         "--save_steps=1000", "--per_device_eval_batch_size=8"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    work = tmp_path_factory.mktemp("summarization")
    files = {"train": tiny.write_summaries(work / "train.json", 320, 0),
             "validation": tiny.write_summaries(work / "valid.json", 27, 1),
             "test": tiny.write_summaries(work / "test.json", 21, 2),
             "test_unscored": tiny.write_summaries(work / "test_unscored.json", 21, 3, summaries=False)}
    corpus = tiny.write_text(work / "corpus.txt", files["train"])
    return dict(work=work, files=files, t5=tiny.make_word_t5(work / "t5", corpus),
                bart=tiny.make_bart(work / "bart", corpus))


def data_flags(task, test="test"):
    return [f"--train_file={task['files']['train']}", f"--validation_file={task['files']['validation']}",
            f"--test_file={task['files'][test]}"]


@pytest.fixture(scope="module")
def t5_runs(task):
    """The untrained T5 evaluated, and T5 trained on one device (its test set without summaries)."""
    model = [f"--config_name={task['t5']}", f"--tokenizer_name={task['t5']}"]
    untrained = task["work"] / "t5_untrained"
    run_summarization_flax.main([f"--output_dir={untrained}", *model, *data_flags(task), *LENGTHS, "--do_eval",
                                 "--do_predict", "--predict_with_generate", "--per_device_eval_batch_size=8"])
    trained = task["work"] / "t5_trained"
    run_summarization_flax.main([f"--output_dir={trained}", *model, *data_flags(task, "test_unscored"), *LENGTHS,
                                 *TRAIN, "--do_train", "--do_eval", "--do_predict", "--predict_with_generate",
                                 "--per_device_train_batch_size=16", "--label_smoothing_factor=0.1"])
    return untrained, trained


def test_sigterm_then_the_same_command_ends_as_the_uninterrupted_run(task, t5_runs):
    """From the working directory with relative paths: SIGTERM mid-run (no regular save yet), the same command."""
    relative = ["--train_file=train.json", "--validation_file=valid.json", "--test_file=test_unscored.json",
                "--config_name=t5", "--tokenizer_name=t5"]
    args = ["--output_dir=stopped", *relative, *LENGTHS, *TRAIN, "--do_train", "--do_eval", "--do_predict",
            "--predict_with_generate", "--per_device_train_batch_size=16", "--label_smoothing_factor=0.1"]
    stopped = tiny.run_script("run_summarization_flax.py", args, devices=1, cwd=task["work"],
                              signal={"SIGNAL_AT_STEP": 33}, returncode=143)
    tiny.stopped_by_signal(stopped, task["work"] / "stopped", step=33)
    tiny.run_script("run_summarization_flax.py", args, devices=1, cwd=task["work"])
    tiny.assert_same_run(task["work"] / "stopped", t5_runs[1])
    assert (task["work"] / "stopped" / "generated_predictions.txt").read_text() == \
        (t5_runs[1] / "generated_predictions.txt").read_text()


def test_t5_learns_far_above_the_untrained_model(t5_runs):
    untrained, trained = t5_runs
    before, after = tiny.read_json(untrained / "eval_results.json"), tiny.read_json(trained / "eval_results.json")
    for key, margin in (("eval_rouge1", 50), ("eval_rouge2", 30), ("eval_rougeL", 50), ("eval_rougeLsum", 50)):
        assert after[key] > before[key] + margin, (key, before, after)
    assert after["eval_loss"] < before["eval_loss"] / 2, (before, after)
    losses = [loss for _, loss, _ in tiny.loss_curve(trained)]
    assert losses[-1] < losses[0] / 2, losses


def test_results_files_have_the_promised_keys(t5_runs):
    untrained, trained = t5_runs
    rouge = {"rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len"}
    assert set(tiny.read_json(trained / "eval_results.json")) == {
        f"eval_{k}" for k in {"loss", "accuracy", "perplexity", "samples", *rouge}}
    # Scored test set: loss and ROUGE; a test set without summaries: its summaries' length only.
    assert set(tiny.read_json(untrained / "test_results.json")) == {
        f"test_{k}" for k in {"loss", "accuracy", "perplexity", "samples", *rouge}}
    assert set(tiny.read_json(trained / "test_results.json")) == {"test_gen_len", "test_samples"}
    assert tiny.read_json(trained / "eval_results.json")["eval_samples"] == 27
    assert {"train_loss", "train_samples", "eval_rouge1", "test_gen_len"} <= set(
        tiny.read_json(trained / "all_results.json"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_args.json", "log_history.jsonl"):
        assert (trained / name).is_file(), name


def test_one_summary_per_test_example_in_order(task, t5_runs):
    _, trained = t5_runs
    lines = (trained / "generated_predictions.txt").read_text().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 21
    # Trained, the model names each document's topic word; in order, line i names document i's.
    named = [topic in line.split() for (topic, _), line in zip(tiny.topics(21, 3), lines)]
    assert sum(named) >= 17, list(zip(tiny.topics(21, 3), lines))


def test_length_buckets_give_what_padding_to_the_maximum_gives(task, t5_runs, tmp_path, monkeypatch):
    """Documents of 8 to 60 tokens, taken shortest first in batches padded to two widths fitted to them, give the
    loss, ROUGE and summaries (in the data's order) that padding every batch to --max_source_length gives."""
    varied = tmp_path / "varied.json"
    with open(task["files"]["validation"]) as f, open(varied, "w") as out:
        for i, row in enumerate(map(json.loads, f)):
            out.write(json.dumps({**row, "document": " ".join([row["document"]] * (1 + i % 6))}) + "\n")
    widths = {}
    padded_batch = seq2seq_batches.batch

    def recorded(examples, batch_widths, *args):
        widths[name].add(batch_widths)
        return padded_batch(examples, batch_widths, *args)

    monkeypatch.setattr(seq2seq_batches, "batch", recorded)
    for name, flags in (("buckets", []), ("padded", ["--pad_to_max_length"])):
        widths[name] = set()
        run_summarization_flax.main([
            f"--output_dir={tmp_path / name}", f"--model_name_or_path={t5_runs[1]}", f"--validation_file={varied}",
            f"--test_file={varied}", "--max_source_length=64", "--max_target_length=16", "--do_eval", "--do_predict",
            "--predict_with_generate", "--per_device_eval_batch_size=4"] + flags)
    assert widths["padded"] == {(64, 16)}
    assert widths["buckets"] == {(32, 16), (64, 16)}, widths  # (the half of them up to 32 tokens, the rest)
    buckets, padded = (tiny.read_json(tmp_path / name / "all_results.json") for name in ("buckets", "padded"))
    assert buckets.keys() == padded.keys()
    for key in buckets:
        assert buckets[key] == pytest.approx(padded[key], rel=1e-5), key
    assert buckets["test_rouge1"] > 50, buckets  # the trained model, on documents longer than it saw
    assert (tmp_path / "buckets" / "generated_predictions.txt").read_text() == \
        (tmp_path / "padded" / "generated_predictions.txt").read_text()


@pytest.fixture(scope="module")
def bart_on_eight_devices(task):
    """BART trained on 8 devices with --fsdp 8; and data-parallel and --fsdp 4 --tensor_parallel 2 runs beside it."""
    work = task["work"] / "bart8"
    work.mkdir()
    layouts = tiny.sharded_runs("run_summarization_flax.py", [
        f"--config_name={task['bart']}", f"--tokenizer_name={task['bart']}",
        *data_flags(task), *LENGTHS, *TRAIN, "--do_train", "--do_eval", "--do_predict", "--predict_with_generate",
        "--per_device_train_batch_size=2", "--per_device_eval_batch_size=2"], work)
    return work / "fsdp8", layouts


def test_bart_trains_and_summarizes_the_same_on_every_mesh(bart_on_eight_devices):
    out, layouts = bart_on_eight_devices
    tiny.assert_split(layouts["fsdp8"], 8)
    tiny.assert_split(layouts["fsdp4_tp2"], 4)
    for mesh in ("fsdp8", "fsdp4_tp2"):
        tiny.assert_same_training(out.parent / mesh, out.parent / "fsdp1")
        assert (out.parent / mesh / "generated_predictions.txt").read_text() == \
            (out.parent / "fsdp1" / "generated_predictions.txt").read_text()


def test_bart_learns_on_eight_devices(bart_on_eight_devices):
    bart_on_eight_devices, _ = bart_on_eight_devices
    results = tiny.read_json(bart_on_eight_devices / "all_results.json")
    assert results["eval_rouge1"] > 50 and results["test_rouge1"] > 50, results  # untrained: about 0
    assert results["eval_samples"] == 27 and results["test_samples"] == 21
    losses = [loss for _, loss, _ in tiny.loss_curve(bart_on_eight_devices)]
    assert losses[-1] < losses[0] / 2, losses


def test_eight_devices_count_every_test_example_once(task, bart_on_eight_devices, tmp_path):
    """Predicting alone with the saved model on one device (batches of 8, not 16; no training data read) gives the
    8-device run's test metrics and summaries."""
    bart_on_eight_devices, _ = bart_on_eight_devices
    out = tmp_path / "predict"
    run_summarization_flax.main([f"--output_dir={out}", f"--model_name_or_path={bart_on_eight_devices}",
                                 f"--train_file={tmp_path}/absent.json", f"--test_file={task['files']['test']}",
                                 *LENGTHS, "--do_predict", "--per_device_eval_batch_size=8"])
    eight, one = (tiny.read_json(d / "test_results.json") for d in (bart_on_eight_devices, out))
    assert eight.keys() == one.keys()
    for key in eight:
        assert one[key] == pytest.approx(eight[key], rel=1e-5, abs=1e-4), key
    assert (out / "generated_predictions.txt").read_text() == (
        bart_on_eight_devices / "generated_predictions.txt").read_text()
    assert not os.path.exists(out / "eval_results.json")


def test_tiny_pegasus_learns_to_summarize(task, tmp_path):
    """Pegasus (sinusoidal positions, pre-norm, pad 0 as the decoder start) with the T5 word-level tokenizer (<pad>
    0, </s> 1, <unk> 2; </s> after every text: Pegasus's layout): it learns, and its export loads in PyTorch as a
    PegasusForConditionalGeneration whose position tables were never moved."""
    from transformers import AutoConfig, AutoTokenizer

    from flaxtrain.models import marian

    model = tmp_path / "pegasus"
    shutil.copytree(task["t5"], model)
    AutoConfig.for_model("pegasus", vocab_size=len(AutoTokenizer.from_pretrained(model)), d_model=32,
                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, init_std=0.1,
                         scale_embedding=True, activation_function="relu", pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0, forced_eos_token_id=1).save_pretrained(model)
    out = tmp_path / "run"
    run_summarization_flax.main([
        f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}", *data_flags(task), *LENGTHS,
        *TRAIN, "--per_device_train_batch_size=16", "--do_train", "--do_eval", "--do_predict",
        "--predict_with_generate"])
    results = tiny.read_json(out / "all_results.json")
    assert results["eval_rouge1"] > 50 and results["test_rouge1"] > 50, results  # untrained: about 0
    losses = [loss for _, loss, _ in tiny.loss_curve(out)]
    assert losses[-1] < losses[0] / 2, losses
    assert json.loads((out / "config.json").read_text())["architectures"] == ["PegasusForConditionalGeneration"]

    pytest.importorskip("torch")
    from transformers import PegasusForConditionalGeneration

    loaded, info = PegasusForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    for stack in (loaded.model.encoder, loaded.model.decoder):  # trained, yet never moved (nor decayed)
        np.testing.assert_array_equal(stack.embed_positions.weight.detach().numpy(), marian.sinusoidal_table(32, 32))


def test_generation_settings_the_script_does_not_apply_are_named(tmp_path, caplog):
    """Blenderbot's encoder_no_repeat_ngram_size and Marian's bad_words_ids change what transformers generates;
    a run whose model sets them says that it does not apply them."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from flaxtrain.settings import ModelSource

    GenerationConfig(encoder_no_repeat_ngram_size=3, bad_words_ids=[[58100]], num_beams=4).save_pretrained(tmp_path)
    data_args = SimpleNamespace(generation_max_length=10, num_beams=1, length_penalty=None, no_repeat_ngram_size=None)
    with caplog.at_level("WARNING"):
        run_summarization_flax.generation_options(ModelSource(str(tmp_path)), data_args, None, 1)
    assert "encoder_no_repeat_ngram_size=3, bad_words_ids=[[58100]], which this script does not apply" in caplog.text


def test_rouge_lsum_reads_one_sentence_per_line():
    swapped = run_summarization_flax.rouge_scores(["The dog ran home. The cat sat down."],
                                                  ["The cat sat down. The dog ran home."])
    assert swapped["rouge1"] == 100 and swapped["rougeLsum"] == 100 > swapped["rougeL"], swapped
    assert run_summarization_flax.rouge_scores(["cats running"], ["cat runs"])["rouge1"] == 100  # stemmed

"""A smoke run of run_summarization_flax.py with a tiny Pegasus (sinusoidal positions, pre-norm, pad 0 as the
decoder start): it learns the tiny summarization task of tests/test_run_summarization.py, and its export loads in
PyTorch as a PegasusForConditionalGeneration."""

import json

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

import run_summarization_flax
from flaxtrain.models import marian
from tests import tiny


def make_pegasus(model_dir, corpus):
    """A word-level tokenizer in Pegasus's layout (<pad> 0, </s> 1, <unk> 2; </s> after every text: T5's, which
    tiny.make_word_t5 makes) and a tiny Pegasus config beside it."""
    tiny.make_word_t5(model_dir, corpus)
    AutoConfig.for_model("pegasus", vocab_size=len(AutoTokenizer.from_pretrained(model_dir)), d_model=32,
                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, init_std=0.1,
                         scale_embedding=True, activation_function="relu", pad_token_id=0, eos_token_id=1,
                         decoder_start_token_id=0, forced_eos_token_id=1).save_pretrained(model_dir)
    return str(model_dir)


def test_tiny_pegasus_learns_to_summarize(tmp_path):
    files = {"train": tiny.write_summaries(tmp_path / "train.json", 320, 0),
             "validation": tiny.write_summaries(tmp_path / "valid.json", 27, 1),
             "test": tiny.write_summaries(tmp_path / "test.json", 21, 2)}
    model = make_pegasus(tmp_path / "pegasus", tiny.write_text(tmp_path / "corpus.txt", files["train"]))
    out = tmp_path / "run"
    run_summarization_flax.main([
        f"--output_dir={out}", f"--config_name={model}", f"--tokenizer_name={model}",
        f"--train_file={files['train']}", f"--validation_file={files['validation']}", f"--test_file={files['test']}",
        "--max_source_length=12", "--max_target_length=10", "--learning_rate=5e-3", "--warmup_steps=10",
        "--max_steps=80", "--logging_steps=20", "--eval_steps=1000", "--save_steps=1000",
        "--per_device_train_batch_size=16", "--per_device_eval_batch_size=8", "--do_train", "--do_eval",
        "--do_predict", "--predict_with_generate"])
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

    GenerationConfig(encoder_no_repeat_ngram_size=3, bad_words_ids=[[58100]], num_beams=4).save_pretrained(tmp_path)
    model_args = SimpleNamespace(model_name_or_path=str(tmp_path), config_name=None, cache_dir=None, token=None,
                                 model_revision="main")
    data_args = SimpleNamespace(generation_max_length=10, num_beams=1, length_penalty=None, no_repeat_ngram_size=None)
    with caplog.at_level("WARNING"):
        run_summarization_flax.generation_options(model_args, data_args, None, 1)
    assert "encoder_no_repeat_ngram_size=3, bad_words_ids=[[58100]], which this script does not apply" in caplog.text

"""A smoke run of run_clm_flax.py with a tiny GPT-Neo (a global and a local layer): it learns, writes every file and
exports a checkpoint that names GPTNeoForCausalLM. (Generation through the cache, local window included, is
tests/test_gpt_neo_gptj_parity.py's: the script calls the same flaxtrain.generate.)"""

import os

import run_clm_flax
from tests import tiny


def test_gpt_neo_learns_and_writes_every_file(tmp_path):
    from transformers import AutoConfig

    train = tiny.write_corpus(tmp_path / "train.txt")
    valid = tiny.write_corpus(tmp_path / "valid.txt", lines=20, seed=1)
    model_dir = tiny.make_decoder(tmp_path / "neo", train, "gpt2")  # GPT-2's byte-level tokenizer ...
    eos = AutoConfig.from_pretrained(model_dir).eos_token_id
    AutoConfig.for_model(  # ... and a GPT-Neo config in place of GPT-2's; a window of 8, shorter than the blocks
        "gpt_neo", vocab_size=AutoConfig.from_pretrained(model_dir).vocab_size, hidden_size=32, num_layers=2,
        num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64,
        bos_token_id=eos, eos_token_id=eos, initializer_range=0.1).save_pretrained(model_dir)

    out = tmp_path / "run"
    run_clm_flax.main([
        f"--output_dir={out}", f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model_dir}",
        f"--tokenizer_name={model_dir}", "--do_train", "--do_eval", "--block_size=32",
        "--per_device_train_batch_size=16", "--learning_rate=3e-3", "--warmup_steps=5", "--max_steps=60",
        "--logging_steps=10", "--save_steps=60", "--eval_steps=60"])

    losses = [loss for _, loss, _ in tiny.loss_curve(out)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] / 2, losses  # steps 10, 20, ..., 60
    results = tiny.read_json(out / "all_results.json")
    assert results["eval_perplexity"] < 15 and results["eval_accuracy"] > 0.8, results  # untrained: about 400
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_results.json", "eval_results.json",
                 "log_history.jsonl"):
        assert (out / name).is_file(), name
    assert os.listdir(out / "checkpoints") == ["60"]
    config = tiny.read_json(out / "config.json")
    assert config["architectures"] == ["GPTNeoForCausalLM"] and config["attention_layers"] == ["global", "local"]

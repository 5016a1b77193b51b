"""Smoke runs of run_clm_flax.py on tiny local data: GPT-2, Llama and GPT-Neo learn, write every file, continue
prompts, stream and resume a stream exactly; bad input fails before any work."""

import os
import shutil

import pytest

import run_clm_flax
from tests import tiny

FLAGS = ["--block_size=32", "--learning_rate=3e-3", "--warmup_steps=5", "--max_steps=60", "--logging_steps=10",
         "--save_steps=30", "--eval_steps=30"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("clm")
    train = tiny.write_corpus(work / "train.txt")
    valid = tiny.write_corpus(work / "valid.txt", lines=20, seed=1)
    models = {kind: tiny.make_decoder(work / kind, train, kind) for kind in ("gpt2", "llama")}
    files = [f"--train_file={train}", f"--validation_file={valid}"]
    return dict(work=work, models=models, files=files, train=train,
                data={k: [*files, f"--config_name={m}", f"--tokenizer_name={m}"] for k, m in models.items()})


def test_gpt2_learns_writes_every_file_and_continues_prompts(setup, tmp_path):
    untrained = tmp_path / "untrained"
    run_clm_flax.main([f"--output_dir={untrained}", "--do_eval", *setup["data"]["gpt2"], *FLAGS])
    before = tiny.read_json(untrained / "eval_results.json")

    out = tmp_path / "run"
    run_clm_flax.main([f"--output_dir={out}", "--do_train", "--do_eval", "--do_predict", "--prompt=amber amber amber",
                       "--max_new_tokens=6", "--per_device_train_batch_size=16", *setup["data"]["gpt2"], *FLAGS])
    after = tiny.read_json(out / "eval_results.json")
    assert after["eval_perplexity"] < before["eval_perplexity"] / 20, (before, after)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_results.json", "all_results.json",
                 "log_history.jsonl", "generations.jsonl"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "checkpoints"), key=int) == ["30", "60"]
    generation = tiny.read_json(out / "generations.jsonl")  # one line: one prompt
    assert generation["greedy"].split() == ["amber"] * 6  # the corpus repeats each line's word
    assert generation["sampled"].strip()


def test_gpt_neo_learns_and_writes_every_file(setup, tmp_path):
    """A tiny GPT-Neo (a global and a local layer): it learns, writes every file and exports a checkpoint that names
    GPTNeoForCausalLM. (Generation through the cache, local window included, is tests/test_parity_quirks.py's: the
    script calls the same flaxtrain.generate.)"""
    from transformers import AutoConfig

    model_dir = tmp_path / "neo"
    shutil.copytree(setup["models"]["gpt2"], model_dir)  # GPT-2's byte-level tokenizer ...
    gpt2 = AutoConfig.from_pretrained(model_dir)
    AutoConfig.for_model(  # ... and a GPT-Neo config in place of GPT-2's; a window of 8, shorter than the blocks
        "gpt_neo", vocab_size=gpt2.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64,
        bos_token_id=gpt2.eos_token_id, eos_token_id=gpt2.eos_token_id, initializer_range=0.1,
    ).save_pretrained(model_dir)

    out = tmp_path / "run"
    run_clm_flax.main([
        f"--output_dir={out}", *setup["files"], f"--config_name={model_dir}", f"--tokenizer_name={model_dir}",
        "--do_train", "--do_eval", "--block_size=32", "--per_device_train_batch_size=16", "--learning_rate=3e-3",
        "--warmup_steps=5", "--max_steps=60", "--logging_steps=10", "--save_steps=60", "--eval_steps=60"])

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


def test_llama_learns_the_same_with_fsdp_and_tensor_parallel(setup, tmp_path):
    """On 8 devices: data parallelism, --fsdp 8 and --fsdp 4 --tensor_parallel 2 train the same model (grouped-query
    attention: 4 heads, 2 key/value heads), every leaf of the state split; the prompts continue the same."""
    args = ["--per_device_train_batch_size=2", *setup["data"]["llama"], *FLAGS, "--do_train", "--do_eval",
            "--do_predict", "--prompt=amber amber amber", "--max_new_tokens=4"]
    layouts = tiny.sharded_runs("run_clm_flax.py", args, tmp_path)
    whole = tmp_path / "fsdp1"
    results = tiny.read_json(whole / "all_results.json")
    assert results["eval_perplexity"] < 15 and results["eval_accuracy"] > 0.8, results  # untrained: about 400
    assert tiny.read_json(whole / "config.json")["architectures"] == ["LlamaForCausalLM"]
    for mesh, ways in (("fsdp8", 8), ("fsdp4_tp2", 4)):
        tiny.assert_same_training(tmp_path / mesh, whole)
        tiny.assert_split(layouts[mesh], ways)
        assert tiny.read_json(tmp_path / mesh / "generations.jsonl")["greedy"] == \
            tiny.read_json(whole / "generations.jsonl")["greedy"]


def test_sigterm_on_a_stream_then_the_same_command_continues_exactly(setup, monkeypatch):
    """Streaming, from the working directory with relative paths: SIGTERM between two saves, then the same command
    again, which replays the stream to where it stopped."""
    monkeypatch.chdir(setup["work"])
    flags = ["--streaming", "--per_device_train_batch_size=8", "--train_file=train.txt", "--validation_file=valid.txt",
             "--config_name=gpt2", "--tokenizer_name=gpt2", *FLAGS, "--max_steps=40", "--save_steps=20",
             "--eval_steps=1000"]
    run_clm_flax.main(["--output_dir=whole", *flags])

    stopped = tiny.run_script("run_clm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup["work"],
                              signal={"SIGNAL_AT_STEP": 25}, returncode=143)
    assert "SIGTERM received: finishing the step in flight" in stopped.stderr and "Traceback" not in stopped.stderr
    tiny.stopped_by_signal(stopped, setup["work"] / "run", step=25)
    tiny.run_script("run_clm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup["work"])
    assert [s for s, _, _ in tiny.loss_curve("run")] == [10, 20, 30, 40]
    tiny.assert_same_run("run", "whole")
    assert tiny.read_json("whole/all_results.json")["eval_perplexity"] < 30  # untrained: about 400


def test_a_tokenizer_larger_than_a_new_models_vocab_grows_it(setup, tmp_path):
    """The original GPT-2 recipe: the config's vocab_size leaves out a token of the tokenizer. From scratch the
    vocabulary grows to a multiple of 128; from pretrained weights it cannot."""
    from transformers import AutoConfig, AutoTokenizer

    small = tmp_path / "small"
    AutoConfig.from_pretrained(setup["models"]["gpt2"], vocab_size=300).save_pretrained(small)
    out = tmp_path / "run"
    run_clm_flax.main([f"--output_dir={out}", *setup["files"], f"--config_name={small}",
                       f"--tokenizer_name={setup['models']['gpt2']}", *FLAGS, "--max_steps=2", "--do_train"])
    assert tiny.read_json(out / "config.json")["vocab_size"] == 384  # 300 < len(tokenizer) <= 384

    bigger = AutoTokenizer.from_pretrained(setup["models"]["gpt2"])
    bigger.add_tokens([f"<extra_{i}>" for i in range(40)])  # 400 tokens
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match="The tokenizer has 400 tokens but the model's vocab_size is 384"):
        run_clm_flax.main([f"--output_dir={tmp_path / 'again'}", *setup["files"], f"--model_name_or_path={out}",
                           f"--tokenizer_name={tmp_path / 'bigger'}", *FLAGS, "--max_steps=2", "--do_train"])


@pytest.mark.parametrize("flags, match", [
    (["--block_size=100"], "--block_size=100 is more than the model's 64 positions"),
    (["--streaming"], "--streaming needs --max_steps"),
    (["--do_predict"], "--do_predict needs --prompt or --prompts_file"),
])
def test_bad_flags(setup, tmp_path, flags, match):
    out = tmp_path / "out"
    args = [f"--output_dir={out}", *setup["data"]["gpt2"], "--block_size=32", "--num_train_epochs=1", *flags]
    with pytest.raises(ValueError, match=match):
        run_clm_flax.main(args)
    assert not out.exists()


def test_corpus_shorter_than_one_block(setup, tmp_path):
    (tmp_path / "short.txt").write_text("amber amber\n")
    model = setup["models"]["gpt2"]
    with pytest.raises(ValueError, match="train data gives no block of 32 tokens"):
        run_clm_flax.main([f"--output_dir={tmp_path}/out", f"--train_file={tmp_path}/short.txt", "--do_train",
                           f"--config_name={model}", f"--tokenizer_name={model}", "--block_size=32"])
    assert not (tmp_path / "out").exists()


def test_unsupported_model_type_lists_the_supported_ones(setup, tmp_path):
    roberta = tiny.make_roberta(tmp_path / "roberta", setup["train"])
    with pytest.raises(ValueError, match="'roberta' is not supported.*gpt2, .*llama, mistral, .*qwen2"):
        run_clm_flax.main([f"--output_dir={tmp_path}/out", *setup["files"], f"--config_name={roberta}",
                           f"--tokenizer_name={setup['models']['gpt2']}"])

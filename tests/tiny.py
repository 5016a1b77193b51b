"""Tiny, learnable data and models that the tests build for themselves (nothing is downloaded)."""

import csv
import json
import os

import numpy as np
import pytest

WORDS = ("amber basil cedar dune ember fern grove heath iris juniper kelp larch moss nettle olive pine quartz "
         "reed sage thyme umber vale willow yarrow zinnia").split()
PAIR_LABELS = ("cold", "mild", "warm")


def write_pairs(path, rows, seed, labelled=True, regression=False):
    """sentence1: noise words; sentence2: one word three times, whose place in WORDS sets the label (its third
    of the list as a name, or its position scaled to 0..5 for regression). Returns the true labels."""
    rng = np.random.default_rng(seed)
    truth = []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence1", "sentence2", *(["label"] if labelled else [])])
        for _ in range(rows):
            k = int(rng.integers(len(WORDS)))
            label = round(5 * k / (len(WORDS) - 1), 3) if regression else PAIR_LABELS[k * 3 // len(WORDS)]
            truth.append(label)
            writer.writerow([" ".join(rng.choice(WORDS, rng.integers(2, 6))), " ".join([WORDS[k]] * 3),
                             *([label] if labelled else [])])
    return truth


def write_corpus(path, lines=200, seed=0):
    """Lines that repeat one random word: a masked word is predictable from its neighbours, so a tiny masked-LM
    learns it in a few dozen steps, while an untrained one cannot."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            word, length = WORDS[rng.integers(len(WORDS))], rng.integers(30, 60)
            f.write(" ".join([word] * length) + "\n")
    return str(path)


def make_roberta(model_dir, corpus, vocab_size=400, max_positions=66, **config):
    """Trains a byte-level BPE tokenizer on `corpus` and saves it with a tiny RoBERTa config in `model_dir`."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import AutoConfig, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([corpus], vocab_size=vocab_size, min_frequency=2,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                        model_max_length=max_positions - 2)
    tokenizer.save_pretrained(model_dir)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=max_positions, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    initializer_range=0.1)  # wider than BERT's 0.02: the tiny model then learns in ~50 steps
    settings.update(config)
    AutoConfig.for_model("roberta", **settings).save_pretrained(model_dir)
    return str(model_dir)


def make_decoder(model_dir, corpus, model_type="gpt2", vocab_size=400, max_positions=64, **config):
    """A byte-level BPE tokenizer with GPT-2's <|endoftext|> and a tiny GPT-2 or Llama-style config."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([corpus], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(model_dir)
    eos = tokenizer.eos_token_id
    if model_type == "gpt2":
        settings = dict(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=max_positions,
                        bos_token_id=eos, eos_token_id=eos, initializer_range=0.1)
    else:
        settings = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False, initializer_range=0.1)
    settings.update(config)
    AutoConfig.for_model(model_type, **settings).save_pretrained(model_dir)
    return str(model_dir)


def make_t5(model_dir, corpus, gated=False, **config):
    """A Unigram tokenizer with T5's sentinels and a tiny T5 (v1.0, or v1.1 with `gated`) config."""
    from transformers import AutoConfig

    from flaxtrain.t5_tokenizer import train_t5_tokenizer

    tokenizer = train_t5_tokenizer([corpus], model_dir, vocab_size=300)
    settings = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    initializer_factor=1.0, decoder_start_token_id=0)
    if gated:
        settings.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    settings.update(config)
    AutoConfig.for_model("t5", **settings).save_pretrained(model_dir)
    return str(model_dir)


def loss_curve(output_dir):
    """(step, train loss, learning rate) of every logged training step."""
    return [(r["step"], r["train/loss"], r["train/learning_rate"]) for r in read_history(output_dir)
            if "train/loss" in r]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_history(output_dir):
    with open(os.path.join(output_dir, "log_history.jsonl")) as f:
        return [json.loads(line) for line in f]


def xla_flags(devices):
    """This process's XLA_FLAGS (any the user set), with `devices` simulated CPU devices instead of its count."""
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*inherited, f"--xla_force_host_platform_device_count={devices}"])


def script_env(devices, env=None) -> dict:
    """The environment of a script's subprocess: `devices` simulated CPU devices, offline, no torch (as on a TPU
    VM: tests/as_on_a_tpu_vm), then `env`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "tests", "as_on_a_tpu_vm")])
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path, **(env or {})}


def run_script(script, args, devices=8, env=None, timeout=600, processes=None, cwd=None, returncode=0, signal=None):
    """Runs `script` with `args` in a fresh Python process with `devices` simulated CPU devices, from the working
    directory `cwd` (default: this one), as a user runs it.

    With `processes=N` it starts N processes that form one multi-host job over 127.0.0.1 (each with `devices`
    local devices) and returns all their results. `signal`: environment settings of tests/signal_at_step.py
    (e.g. {"SIGNAL_AT_STEP": 7}), which then sends the process a real signal after that step. Returns
    CompletedProcess objects, asserting that each exited with `returncode`."""
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = script_env(devices, env)
    command = [sys.executable, os.path.join(root, script), *map(str, args)]
    if signal:
        command.insert(1, os.path.join(root, "tests", "signal_at_step.py"))
        base.update({k: str(v) for k, v in signal.items()})
    if not processes:
        done = subprocess.run(command, env=base, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == returncode, done.stderr[-5000:]
        return done
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [subprocess.Popen(command, env=dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)),
                                cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(processes)]
    results = []
    for w in workers:
        out, err = w.communicate(timeout=timeout)
        assert w.returncode == returncode, err[-5000:]
        results.append(subprocess.CompletedProcess(command, w.returncode, out, err))
    return results


MESHES = {"fsdp1": ["--fsdp=1"], "fsdp8": ["--fsdp=8"], "fsdp4_tp2": ["--fsdp=4", "--tensor_parallel=2"]}


def sharded_runs(script, flags, work, meshes=tuple(MESHES)):
    """Runs `script` with `flags` once for each of `meshes` (names of MESHES) in one process with 8 simulated
    devices, into work/<mesh name>. Returns {mesh name: the layout of the state it trained} (see
    tests/sharded_runs.py)."""
    spec = {"script": script, "runs": [[f"--output_dir={work}/{name}", *flags, *MESHES[name]] for name in meshes],
            "record": str(work / "layouts.json")}
    with open(work / "spec.json", "w") as f:
        json.dump(spec, f)
    run_script("tests/sharded_runs.py", [work / "spec.json"], devices=8)
    return dict(zip(meshes, read_json(work / "layouts.json")))


def assert_split(layout, ways):
    """Every leaf of a state's layout that has a dimension `ways` divides is split over the devices, not whole on
    each (a leaf no dimension of which divides, e.g. a classifier's 3 labels, stays whole, as the rules say)."""
    whole = [path for path, (shape, _, replicated) in layout.items()
             if replicated and any(size % ways == 0 for size in shape)]
    assert not whole, f"not split: {whole}"
    assert any(not replicated for _, _, replicated in layout.values())


# Attention key biases have no gradient (a constant added to every key's score leaves the softmax unchanged), so
# what they get is rounding noise, which Adam scales up to steps of learning-rate size: they differ between any two
# summation orders, data parallelism on 1 and 8 devices too. Only they are left out of weight comparisons.
NO_GRADIENT = r"(\.key|\.k_lin|\.k_proj)\.bias$"


def assert_same_training(output_dir, expected_dir):
    """Two runs of the same training on other meshes: the loss curve (rtol 1e-4) and the exported weights (1e-5)."""
    import re

    from safetensors.numpy import load_file

    np.testing.assert_allclose(loss_curve(output_dir), loss_curve(expected_dir), rtol=1e-4)
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (output_dir, expected_dir))
    assert a.keys() == b.keys()
    for key in a:
        if not re.search(NO_GRADIENT, key):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def stopped_by_signal(done, output_dir, step, exit_within=30.0):
    """Asserts that a run that tests/signal_at_step.py signalled saved a complete checkpoint of exactly `step` (its
    newest), said so (process 0's log), and exited within `exit_within` seconds of the signal. `done`: run_script's
    answer, one process or a list of them."""
    import re
    import time

    from flaxtrain import checkpoint, storage

    hosts = done if isinstance(done, list) else [done]
    sent = float(re.search(r"signal sent at ([\d.]+)", "".join(h.stderr for h in hosts))[1])
    assert time.time() - sent < exit_within, "the run took too long to stop"
    log = hosts[0].stderr
    assert f"after step {step} of" in log and "Run the same command to resume" in log, log[-3000:]
    assert checkpoint.steps(checkpoint.directory_of(str(output_dir)))[-1] == step
    assert not storage.exists(storage.join(str(output_dir), "all_results.json")), "a stopped run must look unfinished"


def assert_same_run(output_dir, expected_dir, rtol=1e-6):
    """Two runs that should be one (e.g. stopped and resumed vs uninterrupted): the same logged loss curve, exported
    weights and evaluation."""
    from safetensors.numpy import load_file

    np.testing.assert_allclose(loss_curve(output_dir), loss_curve(expected_dir), rtol=rtol)
    a, b = load_file(os.path.join(output_dir, "model.safetensors")), load_file(os.path.join(expected_dir,
                                                                                            "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    results, expected = (read_json(os.path.join(d, "all_results.json")) for d in (output_dir, expected_dir))
    for key, value in expected.items():
        if key.startswith("eval_") and isinstance(value, float):
            assert results[key] == pytest.approx(value, rel=1e-5), key


def topics(rows, seed):
    """The topic word of each document that `write_summaries(path, rows, seed)` writes."""
    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(rows):
        topic, *noise = rng.choice(WORDS, size=3, replace=False)
        words = [topic] * int(rng.integers(5, 9)) + noise
        rng.shuffle(words)
        chosen.append((str(topic), " ".join(words)))
    return chosen


def write_summaries(path, rows, seed, summaries=True):
    """Documents of one topic word among two others ("pine thyme pine pine moss pine"), summarized as "The pine
    grows. The pine stays.": the decoder learns the template, and reads the word from the document."""
    with open(path, "w") as f:
        for i, (topic, document) in enumerate(topics(rows, seed)):
            row = {"document": document, "summary": f"The {topic} grows. The {topic} stays.", "id": str(i)}
            if not summaries:
                del row["summary"]
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_text(path, json_file):
    with open(json_file) as f, open(path, "w") as out:
        for row in map(json.loads, f):
            out.write(row["document"] + "\n" + row.get("summary", "") + "\n")
    return str(path)


def make_word_t5(model_dir, corpus):
    """A tiny T5 with a word-level tokenizer in T5's layout (<pad> 0, </s> 1, <unk> 2; </s> after every text),
    trained on `corpus`. (flaxtrain.t5_tokenizer's Unigram trainer cuts so small a corpus into letters.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train([corpus], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False))
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(model_dir)
    AutoConfig.for_model("t5", vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                         initializer_factor=1.0, decoder_start_token_id=0).save_pretrained(model_dir)
    return str(model_dir)


def make_bart(model_dir, corpus, max_positions=32):
    """A tiny BART with a byte-level BPE tokenizer (RoBERTa's, as BART's) trained on `corpus`."""
    from transformers import AutoConfig, AutoTokenizer

    make_roberta(model_dir, corpus)
    AutoConfig.for_model("bart", vocab_size=len(AutoTokenizer.from_pretrained(model_dir)), d_model=32,
                         encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=max_positions, init_std=0.1, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2).save_pretrained(model_dir)
    return str(model_dir)

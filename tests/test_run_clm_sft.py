"""run_clm_flax.py fine-tuning a chat model (SFT) as a user runs it: conversations in jsonl, Qwen2.5's chat template
as shipped (no {% generation %} markers: the assistant turns are found prefix by prefix), examples packed into rows;
it learns to answer held-out questions, stops on SIGTERM and continues exactly, and exports a model that
transformers chats with."""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest

import run_clm_flax
from tests import tiny

TEMPLATE = pathlib.Path(__file__).parent / "fixtures" / "chat_templates" / "qwen2_5.jinja"
# Which colour each thing is: the answer hangs on one word of the question, whatever its wording.
COLOURS = dict(zip(tiny.WORDS[:12], ["red", "blue", "green", "gold", "grey", "pink"] * 2))
ASK = ["What colour is {}?", "Tell me the colour of {}.", "{}: which colour?", "Name the colour of {}."]
HELD_OUT = ASK[-1]  # never in training: the replies to it show what the model learned, not what it saw
FLAGS = ["--block_size=64", "--learning_rate=3e-3", "--warmup_steps=10", "--max_steps=100", "--logging_steps=25",
         "--save_steps=50", "--eval_steps=50", "--per_device_train_batch_size=8", "--per_device_eval_batch_size=8",
         "--weight_decay=0", "--do_train", "--do_eval"]


def chat(question, answer=None):
    messages = [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": question}]
    return messages + ([{"role": "assistant", "content": answer}] if answer else [])


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path.name


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(0)
    seen = [chat(ask.format(thing), colour) for ask in ASK[:-1] for thing, colour in COLOURS.items()]
    write_jsonl(work / "train.jsonl", [seen[i] for i in rng.permutation(len(seen))])
    write_jsonl(work / "valid.jsonl", seen[::5])
    write_jsonl(work / "held_out.jsonl", [chat(HELD_OUT.format(thing)) for thing in COLOURS])
    (work / "chats.csv").write_text("messages\n" + "".join(f'"{json.dumps(c)}"\n'.replace('"', "'")
                                                            for c in seen[:4]))
    (work / "pairs.jsonl").write_text("".join(json.dumps({"prompt": c[1]["content"], "completion": c[2]["content"]})
                                              + "\n" for c in seen))
    corpus = work / "corpus.txt"
    corpus.write_text("".join(f"{m['content']}\nsystem user assistant\n" for c in seen for m in c) * 3)
    model = tiny.make_decoder(work / "model", str(corpus), "llama", vocab_size=300, max_positions=64, hidden_size=64,
                              intermediate_size=128)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(model)
    return work


def test_learns_to_answer_held_out_questions_resumes_exactly_and_chats_in_pytorch(setup, monkeypatch):
    monkeypatch.chdir(setup)
    shutil.copy(TEMPLATE, "chat.jinja")
    flags = ["--train_file=train.jsonl", "--validation_file=valid.jsonl", "--config_name=model",
             "--tokenizer_name=model", "--chat_template=chat.jinja", *FLAGS]
    run_clm_flax.main(["--output_dir=whole", *flags, "--do_predict", "--prompts_file=held_out.jsonl",
                       "--max_new_tokens=4"])

    assert tiny.read_json("whole/eval_results.json")["eval_loss"] < 0.5  # on the answers; untrained: ln(302) = 5.7
    replies = [json.loads(line) for line in open("whole/generations.jsonl")]
    right = sum(r["greedy"].strip(" .\n") == COLOURS[r["messages"][-1]["content"].split()[-1][:-1]]
                for r in replies)
    assert right >= 0.75 * len(COLOURS), replies

    stopped = tiny.run_script("run_clm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup,
                              signal={"SIGNAL_AT_STEP": 70}, returncode=143)
    tiny.stopped_by_signal(stopped, setup / "run", step=70)
    resumed = tiny.run_script("run_clm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup)
    assert "packed into" in resumed.stderr
    tiny.assert_same_run("run", "whole")

    assert_transformers_chats_like_us(setup / "whole", replies[0])


def assert_transformers_chats_like_us(model_dir, ours):
    """The exported folder: its tokenizer carries the chat template and its generation config the end-of-turn
    token, so transformers' generate on the chat gives our greedy reply and stops there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id)[-1] == "<|im_end|>"
    ids = tokenizer.apply_chat_template(ours["messages"], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out[0, -1] in model.generation_config.eos_token_id  # stopped at the end of its turn
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == ours["greedy"]


def test_prompt_completion_one_example_a_padded_row_also_learns(setup, tmp_path):
    out = tmp_path / "run"
    run_clm_flax.main([f"--output_dir={out}", f"--train_file={setup / 'pairs.jsonl'}",
                       f"--validation_file={setup / 'pairs.jsonl'}", f"--config_name={setup / 'model'}",
                       f"--tokenizer_name={setup / 'model'}", "--packing=false", "--max_eval_samples=12", *FLAGS,
                       "--max_steps=60"])
    assert tiny.read_json(out / "eval_results.json")["eval_loss"] < 0.5


def test_packed_rows_train_the_same_split_over_devices_with_remat(setup, tmp_path):
    """On 8 devices (one row each), --fsdp 4 --tensor_parallel 2 with --gradient_checkpointing trains what data
    parallelism trains on the packed rows: the segments reach the split, rematerialised layers."""
    args = [f"--train_file={setup / 'train.jsonl'}", f"--validation_file={setup / 'valid.jsonl'}",
            f"--config_name={setup / 'model'}", f"--tokenizer_name={setup / 'model'}",
            f"--chat_template={TEMPLATE}", "--gradient_checkpointing", *FLAGS, "--per_device_train_batch_size=1",
            "--per_device_eval_batch_size=1", "--max_steps=20", "--save_steps=20", "--eval_steps=20",
            "--logging_steps=5"]
    layouts = tiny.sharded_runs("run_clm_flax.py", args, tmp_path, meshes=("fsdp1", "fsdp4_tp2"))
    tiny.assert_same_training(tmp_path / "fsdp4_tp2", tmp_path / "fsdp1")
    tiny.assert_split(layouts["fsdp4_tp2"], 4)


@pytest.mark.parametrize("flags, message", [
    (["--train_file=train.jsonl"], "has no chat template"),  # conversations, and the tokenizer has none
    (["--train_file=train.jsonl", "--dataset_format=conversational", "--streaming", "--max_steps=5"],
     "--streaming reads text only"),
    (["--train_file=train.jsonl", "--streaming", "--max_steps=5"], "is fine-tuning data (messages)"),
    (["--train_file=chats.csv", "--chat_template=chat.jinja"], "'messages' holds text (as a CSV file has it)"),
    (["--train_file=train.jsonl", "--dataset_format=chats"], "--dataset_format=chats: use one of"),
    (["--train_file=pairs.jsonl", "--dataset_format=conversational"], "needs the column(s) messages"),
])
def test_what_cannot_work_is_refused_before_training(setup, monkeypatch, flags, message):
    monkeypatch.chdir(setup)
    shutil.copy(TEMPLATE, "chat.jinja")
    with pytest.raises(ValueError, match=re.escape(message)):
        run_clm_flax.main(["--output_dir=refused", "--config_name=model", "--tokenizer_name=model", "--do_train",
                           *flags])
    assert not (setup / "refused").exists()

"""--streaming as users run it: from a working directory with relative paths, stopped by SIGTERM and restarted with
the same command, on one host and on two whose shares of the files differ in length. A resumed stream continues
from the record where it stopped (its reader says where), and the run equals the uninterrupted one."""

import re
import shutil

import pytest
from transformers import AutoTokenizer

from tests import tiny

# 64 rows a step: by step 35 the stream is well past its first 256 records (what the tokenizer takes at a time: the
# tiny T5 tokenizer makes 7 chunks of a line), so a resume starts inside the file.
FLAGS = ["--streaming", "--learning_rate=3e-3", "--warmup_steps=5", "--max_steps=40", "--logging_steps=10",
         "--save_steps=10", "--eval_steps=1000", "--per_device_train_batch_size=64", "--shuffle_buffer_size=40"]
SCRIPTS = {"mlm": ("run_mlm_flax.py", ["--max_seq_length=32", "--config_name=roberta", "--tokenizer_name=roberta"]),
           "t5": ("run_t5_mlm_flax.py", ["--max_seq_length=32", "--config_name=t5", "--tokenizer_name=t5"]),
           "clm": ("run_clm_flax.py", ["--block_size=32", "--config_name=gpt2", "--tokenizer_name=gpt2"])}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("stream")
    train = tiny.write_corpus(work / "train.txt", lines=800)
    tiny.write_corpus(work / "valid.txt", lines=20, seed=1)
    tiny.make_roberta(work / "roberta", train)
    tiny.make_t5(work / "t5", train)
    tiny.make_decoder(work / "gpt2", train)
    # Three files: two hosts read two and one of them, shares of different lengths.
    (work / "shards").mkdir()
    lines = (work / "train.txt").read_text().splitlines(keepends=True)
    for i in range(3):
        (work / "shards" / f"part-{i}.txt").write_text("".join(lines[i::3]))
    return work


@pytest.mark.parametrize("task", ["mlm", "t5"])
def test_sigterm_then_the_same_command_continues_the_stream_where_it_stopped(work, task):
    script, flags = SCRIPTS[task]
    flags = [*flags, *FLAGS, "--train_file=train.txt", "--validation_file=valid.txt", "--do_train", "--do_eval"]
    tiny.run_script(script, [f"--output_dir={task}-whole", *flags], devices=1, cwd=work)
    stopped = tiny.run_script(script, [f"--output_dir={task}-run", *flags], devices=1, cwd=work,
                              signal={"SIGNAL_AT_STEP": 35}, returncode=143)
    tiny.stopped_by_signal(stopped, work / f"{task}-run", step=35)
    resumed = tiny.run_script(script, [f"--output_dir={task}-run", *flags], devices=1, cwd=work)
    # The reader reopens train.txt where the records in hand at step 35 began (their shuffle window): past its start.
    record = int(re.search(r"Streaming train.txt from record (\d+)", resumed.stderr)[1])
    assert record > 100, resumed.stderr[-3000:]
    assert [s for s, _, _ in tiny.loss_curve(work / f"{task}-run")] == [10, 20, 30, 40]
    tiny.assert_same_run(work / f"{task}-run", work / f"{task}-whole")
    losses = [loss for _, loss, _ in tiny.loss_curve(work / f"{task}-whole")]
    assert losses[-1] < losses[0]


def test_two_hosts_with_uneven_shares_stop_together_resume_and_refuse_another_host_count(work):
    """Two hosts read 2 and 1 of 3 files: SIGTERM to host 1 stops both after the same step; one host cannot resume
    their input positions (refused in one line); the two hosts resume and finish. The evaluation file is one line:
    host 0's share (every second record) has all its blocks, host 1's none, and neither waits for the other."""
    (work / "valid_line.txt").write_text((work / "valid.txt").read_text().replace("\n", " ") + "\n")
    script, flags = SCRIPTS["clm"]
    # (No compilation cache on several processes: see tests/test_host_split.py.)
    flags = [*flags, *FLAGS, "--train_file=shards", "--validation_file=valid_line.txt", "--do_train", "--do_eval",
             "--compilation_cache_dir=none"]
    stopped = tiny.run_script(script, ["--output_dir=hosts", *flags], devices=2, processes=2, cwd=work,
                              signal={"SIGNAL_AT_STEP": 12, "SIGNAL_PROCESS": 1}, returncode=143)
    tiny.stopped_by_signal(stopped, work / "hosts", step=13)

    alone = tiny.run_script(script, ["--output_dir=hosts", *flags], devices=4, cwd=work, returncode=1)
    assert "was saved by 2 hosts and this run has 1" in alone.stderr

    tiny.run_script(script, ["--output_dir=hosts", *flags], devices=2, processes=2, cwd=work)
    assert [s for s, _, _ in tiny.loss_curve(work / "hosts")] == [10, 20, 30, 40]
    results = tiny.read_json(work / "hosts" / "all_results.json")
    assert results["eval_perplexity"] < 100  # untrained: about 400
    tokens = len(AutoTokenizer.from_pretrained(work / "gpt2")((work / "valid_line.txt").read_text())["input_ids"])
    assert results["eval_samples"] == (tokens + 1) // 32  # every block of the line (+ EOS), all on host 0


def test_a_host_without_data_stops_every_host_with_one_message(work):
    """One line of text, two hosts: host 1's share (every second record) is empty. Both stop, naming it."""
    (work / "one_line.txt").write_text((work / "train.txt").read_text().replace("\n", " ") + "\n")
    script, flags = SCRIPTS["clm"]
    flags = [*flags, *FLAGS, "--train_file=one_line.txt", "--do_train", "--compilation_cache_dir=none"]
    hosts = tiny.run_script(script, ["--output_dir=empty", *flags], devices=1, processes=2, cwd=work, returncode=1)
    for host in hosts:
        assert "Host(s) 1 of 2 have no training batch" in host.stderr
    shutil.rmtree(work / "empty")

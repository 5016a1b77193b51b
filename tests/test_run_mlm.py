"""Smoke runs of run_mlm_flax.py on tiny local data: it learns, writes every promised file, resumes exactly, and
gives the same losses on one host with 8 devices as on two hosts with 4 each; XLM-RoBERTa and BART learn too and
export what PyTorch loads."""

import json
import os
import shutil

import numpy as np
import pytest

import run_mlm_flax
from tests import tiny

FLAGS = ["--max_seq_length=32", "--learning_rate=3e-3", "--warmup_steps=10", "--max_steps=100",
         "--logging_steps=10", "--save_steps=50", "--eval_steps=50", "--weight_decay=0.01", "--adam_beta2=0.98"]


RELATIVE_DATA = ["--train_file=train.txt", "--validation_file=valid.txt", "--config_name=model", "--tokenizer_name=model"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlm")
    train = tiny.write_corpus(work / "train.txt", seed=0)
    valid = tiny.write_corpus(work / "valid.txt", lines=20, seed=1)
    model = tiny.make_roberta(work / "model", train)
    return dict(work=work, model=model, data=[f"--train_file={train}", f"--validation_file={valid}",
                                              f"--config_name={model}", f"--tokenizer_name={model}"])


def test_learns_and_writes_every_file(setup, tmp_path):
    untrained = tmp_path / "untrained"
    run_mlm_flax.main([f"--output_dir={untrained}", "--do_eval", *setup["data"], *FLAGS])
    assert not os.path.exists(untrained / "model.safetensors"), "evaluation alone exports no model"
    before = tiny.read_json(untrained / "eval_results.json")

    out = tmp_path / "run"
    run_mlm_flax.main([f"--output_dir={out}", "--per_device_train_batch_size=16", *setup["data"], *FLAGS])
    after = tiny.read_json(out / "eval_results.json")
    assert after["eval_perplexity"] < before["eval_perplexity"] / 20, (before, after)
    assert after["eval_accuracy"] > 0.6 > before["eval_accuracy"] + 0.5

    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_args.json", "train_results.json",
                 "eval_results.json", "all_results.json", "log_history.jsonl"):
        assert (out / name).is_file(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out))
    assert sorted(os.listdir(out / "checkpoints"), key=int) == ["50", "100"]
    results = tiny.read_json(out / "all_results.json")
    assert results["train_steps"] == 100 and results["eval_loss"] == after["eval_loss"]
    losses = [r["train/loss"] for r in tiny.read_history(out) if "train/loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] / 2.5
    assert tiny.read_json(out / "config.json")["architectures"] == ["RobertaForMaskedLM"]

    # Evaluation alone on the finished run's output_dir evaluates the model trained there, not a new one.
    train_results = (out / "train_results.json").read_text()
    run_mlm_flax.main([f"--output_dir={out}", "--do_eval", *setup["data"], *FLAGS])
    assert tiny.read_json(out / "eval_results.json")["eval_loss"] == pytest.approx(after["eval_loss"], rel=1e-6)
    assert (out / "train_results.json").read_text() == train_results


def test_exported_model_loads_in_pytorch_with_the_same_logits(setup, tmp_path):
    torch = pytest.importorskip("torch")
    import jax
    from transformers import AutoModelForMaskedLM

    from flaxtrain import hf_io, pretrained
    from flaxtrain.models import bert

    out = tmp_path / "run"
    run_mlm_flax.main([f"--output_dir={out}", "--per_device_train_batch_size=16", *setup["data"], *FLAGS[:3],
                       "--max_steps=5", "--do_train"])
    torch_model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_config = pretrained.AutoConfig.from_pretrained(out)
    model = bert.BertForMaskedLM(bert.BertConfig.from_hf(hf_config))
    params = hf_io.load_pretrained(str(out), bert.init_params(model, jax.random.key(0)), model_type="roberta")
    ids = np.array([[0, 283, 225, 289, 2, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4)


def test_sigterm_then_the_same_command_continues_the_uninterrupted_run_exactly(setup, monkeypatch):
    """As a user runs it: from the working directory with relative paths; SIGTERM between two saves; the same
    command again."""
    monkeypatch.chdir(setup["work"])
    flags = ["--per_device_train_batch_size=16", *RELATIVE_DATA, *FLAGS, "--max_steps=40", "--save_steps=20",
             "--eval_steps=1000"]
    run_mlm_flax.main(["--output_dir=whole", *flags])

    # The compiled steps are cached in a folder of our own: the resumed run does not compile its train step again.
    flags.append("--compilation_cache_dir=jax-cache")
    stopped = tiny.run_script("run_mlm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup["work"],
                              signal={"SIGNAL_AT_STEP": 27}, returncode=143, env={"JAX_LOG_COMPILES": "1"})
    tiny.stopped_by_signal(stopped, setup["work"] / "run", step=27)
    assert "cache hit for 'jit_train_step'" not in stopped.stderr and any((setup["work"] / "jax-cache").iterdir())
    resumed = tiny.run_script("run_mlm_flax.py", ["--output_dir=run", *flags], devices=1, cwd=setup["work"],
                              env={"JAX_LOG_COMPILES": "1"})
    assert "Persistent compilation cache hit for 'jit_train_step'" in resumed.stderr
    assert [s for s, _, _ in tiny.loss_curve("run")] == [10, 20, 30, 40]
    tiny.assert_same_run("run", "whole")

    finished = tiny.read_json("whole/all_results.json")
    run_mlm_flax.main(["--output_dir=whole", *flags])  # a finished run, again: nothing to do, results kept
    assert tiny.read_json("whole/all_results.json") == finished


def test_fsdp_tensor_parallel_and_two_hosts_train_the_same_model_and_resume_on_other_meshes(setup, tmp_path):
    """On 8 devices, --fsdp 8 and --fsdp 4 --tensor_parallel 2 train what data parallelism trains, with every
    parameter and optimizer leaf split. Two hosts x 4 devices with --fsdp 8 (shards across hosts): SIGTERM to one
    host stops both after the same step; that checkpoint resumes on the two hosts, and on one host with --fsdp 2
    and with --fsdp 1, each ending as the uninterrupted run."""
    args = ["--per_device_train_batch_size=2", "--per_device_eval_batch_size=3", *setup["data"], *FLAGS]
    layouts = tiny.sharded_runs("run_mlm_flax.py", args, tmp_path)
    whole = tmp_path / "fsdp1"
    for mesh in ("fsdp8", "fsdp4_tp2"):
        tiny.assert_same_training(tmp_path / mesh, whole)
    tiny.assert_split(layouts["fsdp8"], 8)
    tiny.assert_split(layouts["fsdp4_tp2"], 4)
    query = next(v for k, v in layouts["fsdp4_tp2"].items() if k.endswith("['query']['kernel']") and ".params" in k)
    assert query[1] == "P(None, 'fsdp', 'tensor')", query
    assert tiny.read_json(whole / "eval_results.json")["eval_accuracy"] > 0.6

    two_hosts = tmp_path / "two_hosts"
    stopped = tiny.run_script("run_mlm_flax.py", [f"--output_dir={two_hosts}", *args, "--fsdp=8"], devices=4,
                              processes=2, signal={"SIGNAL_AT_STEP": 33, "SIGNAL_PROCESS": 1}, returncode=143)
    tiny.stopped_by_signal(stopped, two_hosts, step=34)
    for fsdp in (2, 1):
        shutil.copytree(two_hosts, tmp_path / f"resumed_fsdp{fsdp}")
    tiny.run_script("run_mlm_flax.py", [f"--output_dir={two_hosts}", *args, "--fsdp=8"], devices=4, processes=2)
    assert sorted(os.listdir(two_hosts / "checkpoints"), key=int) == ["34", "50", "100"]
    for fsdp in (2, 1):
        out = tmp_path / f"resumed_fsdp{fsdp}"
        tiny.run_script("run_mlm_flax.py", [f"--output_dir={out}", *args, f"--fsdp={fsdp}"], devices=8)
    for out in (two_hosts, tmp_path / "resumed_fsdp2", tmp_path / "resumed_fsdp1"):
        tiny.assert_same_training(out, whole)
        assert tiny.read_json(out / "eval_results.json")["eval_loss"] == pytest.approx(
            tiny.read_json(whole / "eval_results.json")["eval_loss"], rel=1e-4)


def test_line_by_line_with_accumulation_remat_and_bfloat16_also_learns(setup, tmp_path):
    out = tmp_path / "run"
    run_mlm_flax.main([f"--output_dir={out}", "--line_by_line", "--per_device_train_batch_size=4",
                       "--gradient_accumulation_steps=4", "--gradient_checkpointing", "--dtype=bfloat16",
                       *setup["data"], *FLAGS, "--max_steps=60"])
    results = tiny.read_json(out / "all_results.json")
    assert results["eval_samples"] == 20  # one example per line
    assert results["eval_accuracy"] > 0.4, results  # untrained: 0


def test_a_diverged_run_writes_strict_json(setup, tmp_path):
    """--learning_rate=1e3 ends with a finite but absurd loss and an infinite perplexity: results and logs say
    null, never the Infinity that strict JSON parsers refuse."""
    import json

    out = tmp_path / "run"
    run_mlm_flax.main([f"--output_dir={out}", *setup["data"], *FLAGS, "--learning_rate=1e3", "--max_steps=6",
                       "--warmup_steps=0", "--logging_steps=3", "--max_grad_norm=0"])

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a JSON file"))

    results = strict((out / "all_results.json").read_text())
    assert results["train_loss"] > 1e3 and results["eval_perplexity"] is None
    for line in (out / "log_history.jsonl").read_text().splitlines():
        strict(line)


def test_xlm_roberta_learns_and_exports_what_pytorch_loads(setup, tmp_path):
    """The fixture's tiny model under XLM-RoBERTa's model_type (its config is RoBERTa's, its classes XLMRoberta*): it
    learns, and exports an XLMRobertaForMaskedLM that transformers loads with every key in place and the same
    logits."""
    model_dir = tmp_path / "model"
    shutil.copytree(setup["model"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="xlm-roberta", architectures=None)
    (model_dir / "config.json").write_text(json.dumps(config))

    out = tmp_path / "run"
    run_mlm_flax.main([f"--output_dir={out}", *setup["data"][:2], f"--config_name={model_dir}",
                       f"--tokenizer_name={model_dir}", "--max_seq_length=32", "--per_device_train_batch_size=16",
                       "--learning_rate=3e-3", "--warmup_steps=10", "--max_steps=100", "--logging_steps=10",
                       "--eval_steps=100", "--save_steps=100", "--weight_decay=0.01", "--adam_beta2=0.98"])
    results = tiny.read_json(out / "all_results.json")
    losses = [r["train/loss"] for r in tiny.read_history(out) if "train/loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0] / 2.5, losses
    assert results["eval_accuracy"] > 0.6, results  # untrained: about 0 (test_learns_and_writes_every_file)
    saved = tiny.read_json(out / "config.json")
    assert (saved["model_type"], saved["architectures"]) == ("xlm-roberta", ["XLMRobertaForMaskedLM"])

    torch = pytest.importorskip("torch")
    import jax
    from transformers import AutoModelForMaskedLM

    from flaxtrain import hf_io, pretrained
    from flaxtrain.models import create

    torch_model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert type(torch_model).__name__ == "XLMRobertaForMaskedLM" and not any(info.values()), info
    family, model = create(pretrained.AutoConfig.from_pretrained(out), "MaskedLM")
    template = jax.eval_shape(lambda: family.init_params(model, jax.random.key(0, impl="rbg")))
    params = hf_io.load_pretrained(str(out), template, model_type="xlm-roberta")
    ids = np.array([[0, 283, 225, 289, 2, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = torch_model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], atol=1e-4)


def test_tiny_bart_learns(tmp_path):
    """A tiny BART (RoBERTa's byte-level tokenizer, which has <mask>): the training loss falls and the masked-token
    accuracy beats the untrained model's; the export is a BartForConditionalGeneration."""
    train = tiny.write_corpus(tmp_path / "train.txt", lines=120, seed=0)
    valid = tiny.write_corpus(tmp_path / "valid.txt", lines=20, seed=1)
    model_dir = tiny.make_bart(tmp_path / "model", train)
    flags = [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model_dir}",
             f"--tokenizer_name={model_dir}", "--max_seq_length=32", "--learning_rate=3e-3", "--warmup_steps=5",
             "--max_steps=40", "--logging_steps=10", "--save_steps=1000", "--eval_steps=1000",
             "--per_device_train_batch_size=16", "--per_device_eval_batch_size=16"]
    run_mlm_flax.main([f"--output_dir={tmp_path / 'untrained'}", "--do_eval", *flags])
    run_mlm_flax.main([f"--output_dir={tmp_path / 'run'}", *flags])
    before, after = (tiny.read_json(tmp_path / d / "eval_results.json") for d in ("untrained", "run"))
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.25, (before, after)  # about 0.5 -> 0.85
    assert after["eval_loss"] < 0.6 * before["eval_loss"], (before, after)
    losses = [loss for _, loss, _ in tiny.loss_curve(tmp_path / "run")]
    assert losses[-1] < 0.7 * losses[0], losses
    assert tiny.read_json(tmp_path / "run" / "config.json")["architectures"] == ["BartForConditionalGeneration"]

"""--push_to_hub, for real, against a fake Hub on 127.0.0.1 (tests/fake_hub.py): tiny runs of every script push
the model, tokenizer, logs, results, model card and training state at each save and at the end, through failing
uploads; a run elsewhere resumes from the pushed state; a refused token stops a run before any work; the token is
never written anywhere. Runs are in process (huggingface_hub's endpoint and offline switches patched) and shared
between the tests through `pushed_run`."""

import importlib
import os

import pytest
import yaml

from tests import tiny
from tests.fake_hub import USER, FakeHub

TOKEN = "hf_TestSecretToken_8c4f1d"
FLAGS = ["--learning_rate=3e-3", "--max_steps=4", "--save_steps=2", "--logging_steps=2", "--eval_steps=2",
         "--per_device_train_batch_size=4", "--per_device_eval_batch_size=4", "--push_to_hub", f"--hub_token={TOKEN}"]


def language_model(make):
    """setup(work) for a script that trains on plain text: the shared tiny corpus and a model `make` builds."""
    def setup(work):
        train, valid = work / "train.txt", work / "valid.txt"
        if not train.exists():
            tiny.write_corpus(train, lines=60)
            tiny.write_corpus(valid, lines=8, seed=1)
        model = make(work / f"model_{make.__name__}", str(train))
        return [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model}",
                f"--tokenizer_name={model}"]
    return setup


def classifier(work):
    """setup(work) for run_flax_glue.py: sentence pairs with three labels and a tiny RoBERTa."""
    train, valid = work / "pairs_train.csv", work / "pairs_valid.csv"
    tiny.write_pairs(train, 40, seed=0)
    tiny.write_pairs(valid, 8, seed=1)
    model = tiny.make_roberta(work / "model_classifier", tiny.write_corpus(work / "pairs_corpus.txt", lines=60))
    return [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model}",
            f"--tokenizer_name={model}"]


def summarizer(work):
    """setup(work) for run_summarization_flax.py: documents with one-sentence summaries and a tiny BART."""
    train, valid = work / "summaries_train.json", work / "summaries_valid.json"
    tiny.write_summaries(train, 40, 0)
    tiny.write_summaries(valid, 8, 1)
    model = tiny.make_bart(work / "model_summarizer", tiny.write_text(work / "summaries_corpus.txt", train))
    return [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model}",
            f"--tokenizer_name={model}"]


# One entry per script: setup(work dir) -> its data and model flags, its own flags, the Hub task of its model card.
SCRIPTS = {
    "run_mlm_flax": dict(setup=language_model(tiny.make_roberta), flags=["--max_seq_length=32"], task="fill-mask"),
    "run_clm_flax": dict(setup=language_model(tiny.make_decoder), flags=["--block_size=32"], task="text-generation"),
    "run_t5_mlm_flax": dict(setup=language_model(tiny.make_t5), flags=["--max_seq_length=32"],
                            task="text2text-generation"),
    "run_flax_glue": dict(setup=classifier, flags=["--max_seq_length=32"], task="text-classification"),
    "run_summarization_flax": dict(setup=summarizer, flags=["--max_source_length=12", "--max_target_length=10"],
                                   task="summarization"),
}
EXPORTED = ("config.json", "model.safetensors", "tokenizer_config.json", "log_history.jsonl", "training_args.json")
RESULTS = ("train_results.json", "eval_results.json", "all_results.json")


@pytest.fixture(scope="module")
def hub():
    """The fake Hub, with huggingface_hub pointed at it (it reads these constants at call time)."""
    from huggingface_hub import constants

    server = FakeHub(token=TOKEN, lfs_threshold=4096)  # the weights go through the LFS routes, small files inline
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", server.url)
        patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest's offline switch would refuse every request
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake speaks git-LFS, not Xet
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield server
    server.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dict(work=tmp_path_factory.mktemp("hub"), flags={})  # flags: each script's setup, made once


def run(name, data, output_dir, capfd, *flags):
    """Runs script `name` in process; returns its captured stdout + stderr."""
    script = SCRIPTS[name]
    if name not in data["flags"]:
        data["flags"][name] = script["setup"](data["work"])
    capfd.readouterr()
    importlib.import_module(name).main([f"--output_dir={output_dir}", *data["flags"][name], *script["flags"], *FLAGS,
                                        *flags])
    out, err = capfd.readouterr()
    return out + err


_runs = {}


@pytest.fixture
def pushed_run(hub, data, capfd):
    """Each script's run with --hub_strategy checkpoint, the server failing its first two commits (cached)."""
    def get(name):
        if name not in _runs:
            output_dir = data["work"] / f"out_{name}"
            hub.fail_uploads, hub.failed = 2, 0
            logs = run(name, data, output_dir, capfd, f"--hub_model_id=runs/{name}", "--hub_strategy=checkpoint")
            _runs[name] = dict(output_dir=output_dir, logs=logs, repo=hub.repos[f"runs/{name}"], failed=hub.failed)
        return _runs[name]
    return get


def assert_no_token(output_dir, *texts):
    for root, _, names in os.walk(output_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(root, name)
    for text in texts:
        assert TOKEN not in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_pushes_model_logs_results_card_and_state_at_every_save(pushed_run, name):
    result = pushed_run(name)
    output_dir, repo = result["output_dir"], result["repo"]
    assert result["failed"] == 2  # the first push was refused twice, retried, and training went on
    messages = [c["message"] for c in repo.commits]
    assert messages[0] == "Step 2: weights, logs, training state", messages
    assert messages[-1] == "Step 4 (end of training): weights, logs, results, eval, model card, training state"
    assert all(m == "Step 4: weights, logs, training state" for m in messages[1:-1]), messages
    first, last = repo.commits[0], repo.commits[-1]
    for commit, step in ((first, 2), (last, 4)):
        for file in EXPORTED:
            assert file in commit["added"], (step, file)
        assert any(p.startswith("events.out.tfevents") for p in commit["added"]), step
        assert any(p.startswith(f"last-checkpoint/{step}/state/") for p in commit["added"]), step
    for file in RESULTS + ("README.md",):
        assert file in last["added"] and file not in first["added"], file

    # The Hub holds exactly what output_dir holds, and only the newest training state.
    for file in EXPORTED + RESULTS + ("README.md",):
        assert repo.files[file] == (output_dir / file).read_bytes(), file
    assert {p.split("/")[1] for p in repo.files if p.startswith("last-checkpoint/")} == {"4"}
    assert not any(p.startswith(("checkpoints/", ".")) for p in repo.files)

    card = repo.files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and SCRIPTS[name]["task"] in metadata["tags"]
    metrics = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert metrics["eval_loss"] == pytest.approx(tiny.read_json(output_dir / "all_results.json")["eval_loss"])
    assert "## Training curve" in card and "--push_to_hub" in card and "--hub_token" not in card
    assert_no_token(output_dir, result["logs"], *(c.decode(errors="replace") for c in repo.files.values()))


def test_a_run_elsewhere_resumes_from_the_pushed_training_state(pushed_run, hub, data, capfd, tmp_path):
    pushed_run("run_mlm_flax")  # pushed its state at step 4
    elsewhere = tmp_path / "elsewhere"
    logs = run("run_mlm_flax", data, elsewhere, capfd, "--hub_model_id=runs/run_mlm_flax",
               "--hub_strategy=checkpoint", "--max_steps=6", "--allow_changed_flags=max_steps")
    assert "Downloaded the training state of step 4" in logs
    assert "loop: step 6: loss" in logs and "loop: step 2: loss" not in logs  # started at 4, not 0
    assert [r["step"] for r in tiny.read_history(elsewhere) if "train/loss" in r] == [2, 4, 6]  # one curve
    assert sorted(os.listdir(elsewhere / "checkpoints"), key=int) == ["4", "6"]
    repo = hub.repos["runs/run_mlm_flax"]
    assert repo.commits[-1]["message"].startswith("Step 6 (end of training)")
    assert {p.split("/")[1] for p in repo.files if p.startswith("last-checkpoint/")} == {"6"}
    assert_no_token(elsewhere, logs)


@pytest.mark.parametrize("status, match", [
    (401, "the Hub at .* refused the token from --hub_token"),
    (403, "--hub_model_id: cannot write to the Hub repo tester/forbidden"),
])
def test_a_refused_token_stops_the_run_before_any_work(hub, data, capfd, tmp_path, status, match):
    hub.refuse = status
    try:
        with pytest.raises(ValueError, match=match):
            run("run_mlm_flax", data, tmp_path / "out", capfd, "--hub_model_id=forbidden")
    finally:
        hub.refuse = None
    out, err = capfd.readouterr()
    assert not (tmp_path / "out").exists()  # no checkpoint, no files: it stopped before training
    assert TOKEN not in out + err
    assert f"{USER}/forbidden" not in hub.repos

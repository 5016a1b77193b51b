"""Where a run starts: the newest checkpoint that restores, an explicit one, or over; never two runs mixed."""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxtrain import checkpoint, loop, parallel, resume, settings, training
from flaxtrain.args import DataArguments, ModelArguments, TrainingArguments, parse_args

RUN = ["--train_file=train.txt", "--learning_rate=1e-3", "--max_steps=100", "--logging_steps=10"]


def flags(output_dir, *extra):
    return parse_args((ModelArguments, DataArguments, TrainingArguments), [f"--output_dir={output_dir}", *RUN, *extra])


def start(output_dir, *extra):
    """resume.start as the lifecycle calls it, after the check of output_dir."""
    run = settings.from_flags(*flags(output_dir, *extra))
    resume.check_writable(run.output.directory)
    return resume.start(run.identity, run.output, run.model, do_train=run.do_train)


def state_like(value=0.0):
    state = training.TrainState.create(apply_fn=None, params={"w": jnp.full(3, value)}, tx=optax.sgd(0.1))
    return parallel.replicate(state, parallel.make_mesh())


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run with checkpoints of steps 1, 2 and 3 (w = step), and the leftover of a save that a kill cut short."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("some text\n")
    record = start("run").record
    saver = checkpoint.Checkpoints("run")
    for step in (1, 2, 3):
        saver.save(step, state_like(step).replace(step=step), {**record, "train_examples": 50})
    saver.wait()
    saver.close()
    (tmp_path / "run" / checkpoint.CHECKPOINTS / "4.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "run" / "model.safetensors").write_text("")
    return tmp_path / "run"


def restored(run, train_examples=50):
    def init_params(model, rng, unbox=True):
        return {"w": jnp.zeros(3)}

    layout = parallel.StateLayout(types.SimpleNamespace(apply=None), init_params, optax.sgd(0.1), parallel.make_mesh(),
                                  parallel.RULES)
    state, step, meta = loop.start_state(layout, run, train_examples, seed=0)
    return float(state.params["w"][0]), step, meta


def test_the_newest_complete_checkpoint_is_resumed(run_dir):
    run = start("run")
    assert (run.checkpoint.step, run.checkpoint.directory) == (3, str(run_dir / checkpoint.CHECKPOINTS))
    assert restored(run)[:2] == (3.0, 3)


def test_an_explicit_checkpoint_is_resumed_and_going_back_drops_the_later_ones(run_dir):
    assert start("run", "--resume_from_checkpoint=run/checkpoints/2").checkpoint.step == 2
    assert sorted(os.listdir(run_dir / checkpoint.CHECKPOINTS)) == ["1", "2", "4.orbax-checkpoint-tmp"]
    assert start("run").checkpoint.step == 2
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        start("run", "--resume_from_checkpoint=nowhere")


def test_starting_over_needs_overwrite_and_removes_old_checkpoints(run_dir):
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        start("run", "--resume_from_checkpoint=none")
    assert start("run", "--resume_from_checkpoint=none", "--overwrite_output_dir").checkpoint is None
    assert not (run_dir / checkpoint.CHECKPOINTS).exists()
    assert start("run", "--overwrite_output_dir").checkpoint is None


def test_a_fresh_or_empty_directory_starts_fresh(tmp_path):
    assert start(tmp_path / "new").checkpoint is None
    assert start(tmp_path).checkpoint is None


@pytest.mark.parametrize("changed, named", [
    (["--learning_rate=3e-4"], "--learning_rate: 0.001 then, 0.0003 now"),
    (["--max_steps=200"], "--max_steps: 100 then, 200 now"),
    (["--seed=7", "--train_file=other.txt"], "--seed: 42 then, 7 now; --train_file: '.*train.txt' then, 'other.txt'"),
    (["--per_device_train_batch_size=4"], "examples_per_update: '8 x 1 devices x 1' then, '4 x 1 devices x 1' now"),
])
def test_a_restart_with_other_flags_is_refused_naming_each(run_dir, changed, named):
    with pytest.raises(ValueError, match=f"{named}.*--resume_from_checkpoint=none --overwrite_output_dir.*"
                                         f"--allow_changed_flags="):
        start("run", *changed)


def test_cadence_and_reporting_flags_may_change_and_a_change_on_purpose_is_allowed(run_dir):
    assert start("run", "--logging_steps=3", "--save_steps=7", "--per_device_eval_batch_size=2", "--do_train",
                 "--max_eval_samples=5").checkpoint.step == 3
    run = start("run", "--learning_rate=3e-4", "--max_steps=200", "--allow_changed_flags=learning_rate,max_steps")
    assert run.checkpoint.step == 3
    with pytest.raises(ValueError, match="train_examples: 50 then, 49 now"):
        restored(run, train_examples=49)


def test_relative_and_absolute_paths_are_the_same_run(run_dir):
    assert start(run_dir, f"--train_file={run_dir.parent / 'train.txt'}").checkpoint.step == 3


def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_is_used(run_dir):
    steps = run_dir / checkpoint.CHECKPOINTS
    (steps / "3" / "state" / "_METADATA").unlink()
    next((steps / "2" / "state" / "d").iterdir()).unlink()  # a data file
    (steps / "1" / "meta" / "metadata").unlink()  # found before any work: the metadata read comes first
    run = start("run")
    assert run.checkpoint.step == 3
    with pytest.raises(ValueError, match="not empty"):  # no checkpoint restores: start over only if told to
        restored(run)
    assert sorted(os.listdir(steps)) == ["1.damaged", "2.damaged", "3.damaged", "4.orbax-checkpoint-tmp"]


def test_the_newest_restorable_checkpoint_is_found_past_damaged_ones(run_dir, caplog):
    steps = run_dir / checkpoint.CHECKPOINTS
    (steps / "3" / "state" / "_METADATA").unlink()
    assert restored(start("run"))[:2] == (2.0, 2)
    assert "3.damaged" in os.listdir(steps) and checkpoint.steps(str(steps)) == [1, 2]
    message = next(r.message for r in caplog.records if "does not restore" in r.message)
    assert "\n" not in message and len(message) < 600, message


@pytest.mark.parametrize("where, error", [("a_file", "is a file, not a folder"),
                                          ("a_file/below", "a_file is a file, not a folder"),
                                          ("/sys/flaxtrain-test", "cannot write in /sys")])
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, where, error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=f"--output_dir=.*{error}"):
        start(where)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_every_start_is_recorded(tmp_path):
    output_dir = str(tmp_path)
    for step, lr in ((None, "1e-3"), (40, "3e-4")):
        run = settings.from_flags(*flags(output_dir, f"--learning_rate={lr}", "--hub_token=hf_secret"))
        resume.record_start(output_dir, step, run.flags, run.identity)
    records = json.loads((tmp_path / "training_args.json").read_text())
    assert [(r["resumed_from_step"], r["flags"]["learning_rate"]) for r in records] == [(None, 1e-3), (40, 3e-4)]
    assert "hf_secret" not in (tmp_path / "training_args.json").read_text()


def test_progress_since_the_last_log_line_survives_a_restart():
    from flaxtrain.reporting import TrainProgress

    losses = [(3.0, 2.0), (1.0, 3.0), (4.0, 1.0), (5.0, 4.0)]
    whole = TrainProgress(lambda step: 0.0, 1, 10, start_step=10)
    for loss, weight in losses:
        whole.add({"loss_sum": jnp.float32(loss), "weight": jnp.float32(weight)})
    first = TrainProgress(lambda step: 0.0, 1, 10, start_step=10)
    for loss, weight in losses[:2]:
        first.add({"loss_sum": jnp.float32(loss), "weight": jnp.float32(weight)})
    carried = json.loads(json.dumps(first.carry(12)))  # through a checkpoint's JSON
    resumed = TrainProgress(lambda step: 0.0, 1, 10, start_step=12, carried=carried)
    for loss, weight in losses[2:]:
        resumed.add({"loss_sum": jnp.float32(loss), "weight": jnp.float32(weight)})
    assert resumed.record(14)["train/loss"] == whole.record(14)["train/loss"] == np.float64(13.0 / 10.0)


def test_evaluation_alone_takes_the_model_trained_in_output_dir_and_never_replaces_its_results(tmp_path):
    for name in ("config.json", "model.safetensors", "train_results.json"):
        (tmp_path / name).write_text("{}")
    model = start(tmp_path, "--do_eval", "--config_name=mine", "--tokenizer_name=mine").model
    assert (model.name_or_path, model.config_name, model.tokenizer_name) == (str(tmp_path), None, None)
    with pytest.raises(ValueError, match="holds a finished training run: evaluating --model_name_or_path=other"):
        start(tmp_path, "--do_eval", "--model_name_or_path=other")
    start(tmp_path, "--do_eval", "--model_name_or_path=other", "--overwrite_output_dir")  # on purpose

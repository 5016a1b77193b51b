"""Where a run starts: resume from the newest complete checkpoint, an explicit one, or start over."""

import argparse

import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain import checkpoint


def args(output_dir, resume=None, overwrite=False):
    return argparse.Namespace(output_dir=str(output_dir), resume_from_checkpoint=resume, overwrite_output_dir=overwrite)


@pytest.fixture
def run_dir(tmp_path):
    saver = checkpoint.Checkpoints(tmp_path)
    for step in (1, 2):
        saver.save(step, {"w": jnp.full(3, float(step))}, {"update_batch": 8})
    saver.wait()
    saver.close()
    # What a kill in the middle of a save leaves behind: never taken as a checkpoint.
    (tmp_path / checkpoint.CHECKPOINTS / "3.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "model.safetensors").write_text("")
    return tmp_path


def test_the_newest_complete_checkpoint_is_resumed(run_dir):
    directory, step = checkpoint.resolve_start(args(run_dir))
    assert step == 2
    state, meta = checkpoint.restore(directory, step, {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(state["w"], [2.0, 2.0, 2.0])
    assert meta == {"update_batch": 8}


def test_an_explicit_checkpoint_is_resumed(run_dir):
    assert checkpoint.resolve_start(args(run_dir, resume=str(run_dir / "checkpoints" / "1")))[1] == 1
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        checkpoint.resolve_start(args(run_dir, resume=str(run_dir / "nowhere")))


def test_starting_over_needs_overwrite_and_removes_old_checkpoints(run_dir):
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        checkpoint.resolve_start(args(run_dir, resume="none"))
    assert checkpoint.resolve_start(args(run_dir, resume="none", overwrite=True)) is None
    assert not (run_dir / checkpoint.CHECKPOINTS).exists()
    assert checkpoint.resolve_start(args(run_dir, overwrite=True)) is None


def test_a_fresh_or_empty_directory_starts_fresh(tmp_path):
    assert checkpoint.resolve_start(args(tmp_path / "new")) is None
    assert checkpoint.resolve_start(args(tmp_path)) is None


def test_going_back_to_an_older_checkpoint_removes_the_later_ones(run_dir):
    older = str(run_dir / checkpoint.CHECKPOINTS / "1")
    assert checkpoint.resolve_start(args(run_dir, resume=older)) == (str(run_dir / checkpoint.CHECKPOINTS), 1)
    assert not (run_dir / checkpoint.CHECKPOINTS / "2").exists()
    assert checkpoint.resolve_start(args(run_dir))[1] == 1


def test_a_resume_with_other_settings_is_refused_naming_them(run_dir):
    import types

    import optax

    from flaxtrain import loop, parallel

    saver = checkpoint.Checkpoints(run_dir / "other")
    run = argparse.Namespace(adafactor=False, max_grad_norm=1.0, seed=42)
    saver.save(3, {"w": jnp.ones(3)}, loop.run_meta(run, update_batch=8, train_examples=100))
    saver.wait()
    model, mesh = types.SimpleNamespace(apply=None), parallel.make_mesh()
    resume = (str(run_dir / "other" / checkpoint.CHECKPOINTS), 3)
    with pytest.raises(ValueError, match="--seed = 42, this run has 7"):
        loop.start_state(model, {"w": jnp.zeros(3)}, optax.sgd(0.1), mesh, resume,
                         loop.run_meta(argparse.Namespace(adafactor=False, max_grad_norm=1.0, seed=7), 8, 100))
    with pytest.raises(ValueError, match="training examples = 100, this run has 95"):
        loop.start_state(model, {"w": jnp.zeros(3)}, optax.sgd(0.1), mesh, resume, loop.run_meta(run, 8, 95))

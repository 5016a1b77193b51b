"""--load_best_model_at_end's bookkeeping: which evaluation is best (NaN never is), and that a run killed after a
new best but before its next checkpoint resumes with the best its checkpoint knew."""

import flax
import jax.numpy as jnp
import numpy as np

from flaxtrain.best import BestModel


@flax.struct.dataclass
class State:
    params: dict


def params(value):
    return {"layer": {"kernel": jnp.full((2, 3), value, jnp.float32)}}


def test_the_best_evaluation_wins_and_nan_never_does(tmp_path):
    best = BestModel(str(tmp_path), "pearson", None, resumed=None)
    assert best.update(1, {"eval_pearson": float("nan")}, params(1))
    assert best.update(2, {"eval_pearson": 0.5}, params(2))  # any number beats NaN
    assert not best.update(3, {"eval_pearson": float("nan")}, params(3))
    assert not best.update(4, {"eval_pearson": 0.4}, params(4))
    assert best.results() == {"eval_pearson": 0.5, "eval_best_step": 2}
    best.close()
    loss = BestModel(str(tmp_path / "loss"), "eval_loss", None, resumed=None)  # lower is better for losses
    assert loss.update(1, {"eval_loss": 2.0}, params(1)) and loss.update(2, {"eval_loss": 1.0}, params(2))
    assert not loss.update(3, {"eval_loss": 1.5}, params(3))
    loss.close()


def test_a_resumed_run_keeps_the_best_of_its_checkpoint(tmp_path):
    best = BestModel(str(tmp_path), "accuracy", None, resumed=None)
    best.update(1, {"eval_accuracy": 0.9}, params(1))
    meta = best.checkpoint_meta({"seed": 0})  # the checkpoint of step 2
    assert meta["best"]["step"] == 1 and meta["seed"] == 0
    best.update(3, {"eval_accuracy": 0.95}, params(3))  # then killed before the next checkpoint
    best.close()

    resumed = BestModel(str(tmp_path), "accuracy", None, resumed=meta["best"])
    assert resumed.record["step"] == 1
    restored = resumed.restore(State(params(0)))
    np.testing.assert_array_equal(restored.params["layer"]["kernel"], params(1)["layer"]["kernel"])

    resumed.update(4, {"eval_accuracy": 0.97}, params(4))
    resumed.checkpoint_meta({})  # the next checkpoint refers to step 4 only: the other weights go
    resumed.close()
    assert sorted(p.name for p in (tmp_path / "best_model").iterdir()) == ["4", "best.json"]
    fresh = BestModel(str(tmp_path), "accuracy", None, resumed=None)  # a new run forgets an earlier run's best
    assert fresh.record is None and (tmp_path / "best_model").exists() and not fresh.saved.all_steps()
    fresh.close()

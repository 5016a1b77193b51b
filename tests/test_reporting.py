"""Training progress records: token-weighted loss over the interval, and a clear stop on NaN/inf."""

import jax.numpy as jnp
import pytest

from flaxtrain.reporting import MetricsWriter, TrainProgress
from tests import tiny


def test_record_weights_steps_by_tokens_and_reports_rate():
    progress = TrainProgress(lambda step: 0.1 * step, tokens_per_step=100, steps_per_epoch=4, start_step=0)
    progress.add({"loss_sum": jnp.float32(30.0), "weight": jnp.float32(10.0)})
    progress.add({"loss_sum": jnp.float32(10.0), "weight": jnp.float32(30.0)})
    record = progress.record(2)
    assert record["train/loss"] == pytest.approx(1.0)  # 40 / 40, not the mean of 3.0 and 0.33
    assert record["train/learning_rate"] == pytest.approx(0.1) and record["train/epoch"] == 0.5
    assert record["train/tokens_per_second"] > 0


def test_a_non_finite_loss_stops_the_run_naming_the_steps():
    progress = TrainProgress(lambda step: 0.0, tokens_per_step=1, steps_per_epoch=10, start_step=20)
    for loss in (1.0, float("nan"), 1.0):
        progress.add({"loss_sum": jnp.float32(loss), "weight": jnp.float32(1.0)})
    with pytest.raises(FloatingPointError, match="nan in steps 21-23"):
        progress.record(23)


def test_history_of_an_interrupted_run_is_cut_at_the_resumed_step(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in (10, 20, 30):
        writer.write(step, {"train/loss": 1.0})
    writer.close()
    resumed = MetricsWriter(str(tmp_path), resumed_step=20)
    resumed.write(30, {"train/loss": 0.5})
    resumed.close()
    history = tiny.read_history(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in history] == [(10, 1.0), (20, 1.0), (30, 0.5)]

"""The training loop's own rules about its input (flaxtrain/loop.py run_steps), on one host: a stream's error
stops the loop with that error (on several hosts, after every host learned of it: tests/test_streaming_runs.py), and
a stream that ends early says at which step."""

import numpy as np
import pytest

from flaxtrain import loop, parallel


def batches(count, fail=False):
    for i in range(count):
        yield {"x": np.full((1, 2), i, np.float32), "weights": np.ones((1, 2), np.float32)}
    if fail:
        raise ValueError("part-3.jsonl: line 7 is not valid JSON")


def run(stream, total=5):
    trained = []

    def step(state, batch, rng):
        trained.append(float(np.asarray(batch["weights"]).sum()))
        return state + 1, {}

    plan = loop.Plan(0, total, total, None, 1, 2)
    with pytest.raises((ValueError, RuntimeError)) as raised:
        loop.run_steps(0, step, stream, plan, mesh=parallel.make_mesh(), seed=0, hooks=[], on_signal=None)
    return raised.value, trained


def test_a_failing_stream_stops_the_loop_with_its_own_error():
    error, trained = run(batches(3, fail=True))
    assert str(error) == "part-3.jsonl: line 7 is not valid JSON"
    assert trained == [2.0, 2.0, 2.0, 0.0]  # the last step at weight zero: what the other hosts wait for


def test_a_stream_that_ends_early_names_the_step_and_one_that_gives_nothing_stops_at_once():
    error, trained = run(batches(2))
    assert str(error).startswith("The training data ran out at step 3 of 5") and trained == [2.0, 2.0, 0.0]
    error, trained = run(batches(0, fail=True))
    assert str(error) == "part-3.jsonl: line 7 is not valid JSON" and trained == []
    error, trained = run(batches(0))
    assert "no training batch" in str(error) and trained == []

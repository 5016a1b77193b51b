"""Optimizer, schedule, gradient accumulation, loss sums and batch planning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxtrain import data, training


def test_weight_decay_only_on_matrices_even_when_stacked_by_scan():
    params = {"layer": {"dense": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))},
                        "LayerNorm": {"scale": jnp.ones((2, 4)), "bias": jnp.ones((2, 4))}},
              "embeddings": {"word_embeddings": {"embedding": jnp.ones((10, 4))}}}
    mask = training.decay_mask(params)
    assert mask["layer"]["dense"] == {"kernel": True, "bias": False}
    assert mask["layer"]["LayerNorm"] == {"scale": False, "bias": False}
    assert mask["embeddings"]["word_embeddings"]["embedding"]


def test_schedule_warms_up_then_decays_to_zero():
    schedule = training.make_schedule(1e-3, 110, warmup_steps=10)
    assert schedule(0) == 0 and schedule(10) == pytest.approx(1e-3) and schedule(110) == pytest.approx(0)
    assert schedule(5) == pytest.approx(5e-4) and schedule(60) == pytest.approx(5e-4)
    cosine = training.make_schedule(1e-3, 100, warmup_steps=10, kind="cosine")
    assert cosine(10) == pytest.approx(1e-3) and cosine(55) == pytest.approx(5e-4, rel=1e-3)


def test_plan_steps_epochs_fractions_and_max_steps():
    assert training.plan_steps(100, 8) == (12, 36)
    assert training.plan_steps(100, 8, num_train_epochs=0.5) == (12, 6)
    assert training.plan_steps(100, 8, max_steps=5) == (12, 5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        training.plan_steps(7, 8)


@pytest.mark.parametrize("adafactor", [False, True])
def test_optimizers_step_and_clip(adafactor):
    params = {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}}
    tx = training.make_optimizer(1e-2, adafactor=adafactor, weight_decay=0.1)
    grads = jax.tree.map(lambda p: 1e6 * jnp.ones_like(p), params)  # clipped to norm 1 first
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(np.isfinite(x).all() and (x != 0).any() for x in jax.tree.leaves(updates))


@pytest.mark.parametrize("scale", [1e-3, 1e3])  # below the threshold (untouched) and above it (clipped)
def test_clipping_is_optax_clip_by_global_norm(scale):
    grads = {"w": scale * jnp.arange(-6.0, 6.0).reshape(3, 4), "b": scale * jnp.ones(5)}
    ours, theirs = training.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    state = ours.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(grads))  # resumable from either's checkpoints
    clipped, _ = ours.update(grads, state)
    expected, _ = theirs.update(grads, theirs.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, expected)
    assert float(optax.global_norm(clipped)) == pytest.approx(min(1.0, float(optax.global_norm(grads))), rel=1e-6)


def test_accumulated_gradients_equal_the_big_batch():
    w = jnp.arange(6.0).reshape(3, 2)
    batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)}

    def loss_fn(params, b, rng):
        loss = jnp.sum((b["x"] @ params) ** 2)
        return loss, loss

    big, big_aux = training.accumulate_gradients(loss_fn, w, batch, jax.random.key(0), 1)
    acc, acc_aux = training.accumulate_gradients(loss_fn, w, batch, jax.random.key(0), 4)
    np.testing.assert_allclose(acc, big, rtol=1e-5)
    np.testing.assert_allclose(acc_aux, big_aux, rtol=1e-5)


def test_cross_entropy_sums_ignore_zero_weights_and_keep_token_id_zero():
    logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]))
    labels = jnp.array([[0, 2, 1]])  # label 0 is a real token (the original's `labels > 0` dropped it)
    loss, correct, weight = training.cross_entropy_sums(logits, labels, jnp.array([[1.0, 1.0, 0.0]]))
    assert weight == 2 and correct == 2
    assert loss == pytest.approx(-np.log(0.7) - np.log(0.8), rel=1e-5)
    smoothed, _, _ = training.cross_entropy_sums(logits, labels, jnp.ones((1, 3)), label_smoothing=0.1)
    assert smoothed > loss


def test_batches_cover_each_example_once_and_are_reproducible():
    epoch0 = [idx for _, idx in data.train_batches(50, 8, seed=3, epoch=0)]
    assert len(epoch0) == 6 and len(set(np.concatenate(epoch0))) == 48
    again = [idx for _, idx in data.train_batches(50, 8, seed=3, epoch=0, start=2)]
    assert all((a == b).all() for a, b in zip(again, epoch0[2:]))
    epoch1 = [idx for _, idx in data.train_batches(50, 8, seed=3, epoch=1)]
    assert not all((a == b).all() for a, b in zip(epoch0, epoch1))
    evals = list(data.eval_batches(50, 8))
    assert sum(n for _, n in evals) == 50 and all(len(idx) == 8 for idx, _ in evals)
    assert sorted(np.concatenate([idx[:n] for idx, n in evals]).tolist()) == list(range(50))

"""The masked-LM head runs only at the masked positions: the same loss and gradients as the head over every token."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import run_mlm_flax  # noqa: E402
from flaxtrain import training  # noqa: E402
from flaxtrain.models import bert  # noqa: E402

key = functools.partial(jax.random.key, impl="rbg")  # (see test_bert.py)


class Tokenizer:
    vocab_size, mask_token_id, pad_token_id = 99, 4, 1


def global_batch(rows=6, length=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, Tokenizer.vocab_size, (rows, length))
    special = np.zeros_like(ids, dtype=np.int8)
    special[:, 0] = special[:, -1] = 1
    ids[3, 9:], special[3, 9:] = Tokenizer.pad_token_id, 1  # a padded row
    return {"input_ids": ids, "special_tokens_mask": special}


def full_targets(batch):
    """labels and weights over every token [b, T], from the masked positions."""
    weights = np.zeros(batch["input_ids"].shape, np.float32)
    np.put_along_axis(weights, batch["positions"], batch["weights"], axis=1)
    labels = np.zeros_like(batch["input_ids"])
    np.put_along_axis(labels, batch["positions"], batch["labels"], axis=1)
    return labels, weights


def test_max_predictions_covers_the_binomial_tail():
    assert run_mlm_flax.max_predictions(128, 0.15) == 48
    assert run_mlm_flax.max_predictions(16, 0.15) == 16  # never more than the length
    assert run_mlm_flax.max_predictions(512, 0.15) % 8 == 0


def test_every_masked_token_is_a_prediction_and_a_row_never_has_more_than_the_limit():
    batch = global_batch()
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    rows = np.arange(6)
    out = run_mlm_flax.mask_tokens(batch, rng(), rows, Tokenizer, 0.3, predictions=16)
    labels, weights = full_targets(out)
    changed = out["input_ids"] != batch["input_ids"]
    assert (weights[changed] == 1).all() and weights.sum() > changed.sum() > 0  # 10% keep their token
    np.testing.assert_array_equal(labels[weights == 1], batch["input_ids"][weights == 1])
    assert not weights[batch["special_tokens_mask"] == 1].any()
    # Rows split over hosts are masked as the whole batch is.
    half = run_mlm_flax.mask_tokens(batch, rng(), rows[3:], Tokenizer, 0.3, predictions=16)
    for name in out:
        np.testing.assert_array_equal(half[name], out[name][3:])
    # Capped: only the first `predictions` masked tokens of a row are masked; the rest keep their ids.
    capped = run_mlm_flax.mask_tokens(batch, rng(), rows, Tokenizer, 0.9, predictions=8)
    full = run_mlm_flax.mask_tokens(batch, rng(), rows, Tokenizer, 0.9, predictions=16)
    assert (capped["weights"].sum(1) <= 8).all() and (full["weights"].sum(1) > 8).any()
    np.testing.assert_array_equal(capped["positions"], full["positions"][:, :8])
    _, capped_weights = full_targets(capped)
    unmasked = full_targets(full)[1].astype(bool) & ~capped_weights.astype(bool)
    np.testing.assert_array_equal(capped["input_ids"][unmasked], batch["input_ids"][unmasked])


def test_loss_and_gradients_equal_the_head_over_every_token():
    model = bert.BertForMaskedLM(bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=37, type_vocab_size=1,
                                                 pad_token_id=1, max_position_embeddings=32, model_type="roberta"))
    params = bert.init_params(model, key(0))
    batch = run_mlm_flax.mask_tokens(global_batch(), np.random.default_rng(1), np.arange(6), Tokenizer, 0.15,
                                     run_mlm_flax.max_predictions(16, 0.15))
    labels, weights = full_targets(batch)

    def loss(params, positions):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=False,
                             positions=positions, rngs={"dropout": key(2)})
        if positions is None:
            return training.cross_entropy_sums(logits, labels, weights)[0] / weights.sum()
        return training.cross_entropy_sums(logits, batch["labels"], batch["weights"])[0] / weights.sum()

    full_loss, full_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, None)
    head_loss, head_grads = jax.jit(jax.value_and_grad(loss))(params, jnp.asarray(batch["positions"]))
    np.testing.assert_allclose(head_loss, full_loss, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(head_grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)

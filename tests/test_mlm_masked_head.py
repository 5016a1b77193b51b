"""The masked-LM head runs only at the masked positions: the same loss and gradients as the head over every token."""

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import run_mlm_flax  # noqa: E402
from flaxtrain import example_rng, training  # noqa: E402
from flaxtrain.models import bert  # noqa: E402
from tests.test_mlm_collator import full_targets  # noqa: E402

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


def test_loss_and_gradients_equal_the_head_over_every_token():
    model = bert.BertForMaskedLM(bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=37, type_vocab_size=1,
                                                 pad_token_id=1, max_position_embeddings=32, model_type="roberta"))
    params = bert.init_params(model, key(0))
    batch = run_mlm_flax.mask_tokens(global_batch(), example_rng.keys(1, np.arange(6)), Tokenizer, 0.15,
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

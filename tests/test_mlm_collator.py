"""The 80/10/10 masking collator of run_mlm_flax.py, and the masked positions it gives the model's head."""

import numpy as np
import pytest

import run_mlm_flax
from flaxtrain import example_rng
from tests import tiny


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("tok")
    corpus = tiny.write_corpus(work / "corpus.txt")
    return AutoTokenizer.from_pretrained(tiny.make_roberta(work / "model", corpus))


def batch_of(tokenizer, rows=64, length=32):
    texts = [" ".join(tiny.WORDS[(i + k) % len(tiny.WORDS)] for k in range(i % 9 + 4)) for i in range(rows)]
    enc = tokenizer(texts, return_special_tokens_mask=True, truncation=True, max_length=length)
    out = {"input_ids": np.full((rows, length), tokenizer.pad_token_id), "special_tokens_mask": np.ones((rows, length))}
    for i in range(rows):
        n = len(enc["input_ids"][i])
        out["input_ids"][i, :n] = enc["input_ids"][i]
        out["special_tokens_mask"][i, :n] = enc["special_tokens_mask"][i]
    return out


def full_targets(out):
    """The collator's labels and weights at the masked positions, put back into [b, T] arrays (0 elsewhere)."""
    labels, weights = np.zeros_like(out["input_ids"]), np.zeros(out["input_ids"].shape, np.float32)
    np.put_along_axis(labels, out["positions"], out["labels"], axis=1)
    np.put_along_axis(weights, out["positions"], out["weights"], axis=1)
    return labels, weights


def keys(rows, seed=0):
    """Example keys of rows 0 .. rows-1 as training keys them (seed, 2, epoch 0, index)."""
    return example_rng.keys(seed, 2, 0, np.arange(rows))


def take(batch, rows):
    return {name: values[rows] for name, values in batch.items()}


def mask_tokens(batch, keys, tokenizer, probability, predictions=None):
    """run_mlm_flax.mask_tokens, by default with room for every token of a row."""
    return run_mlm_flax.mask_tokens(batch, keys, tokenizer, probability, predictions or batch["input_ids"].shape[1])


def test_masking_rate_and_80_10_10_split(tokenizer):
    batch = batch_of(tokenizer, rows=2000)
    out = mask_tokens(batch, keys(2000), tokenizer, 0.15)
    labels, weights = full_targets(out)
    maskable = batch["special_tokens_mask"] == 0
    chosen = weights > 0
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    replaced = out["input_ids"][chosen] == tokenizer.mask_token_id
    kept = out["input_ids"][chosen] == batch["input_ids"][chosen]
    assert abs(replaced.mean() - 0.8) < 0.02
    assert abs(kept.mean() - 0.1) < 0.02  # (a random token equal to the original counts as kept: rare)
    assert (labels[chosen] == batch["input_ids"][chosen]).all()
    # Unchosen positions are untouched.
    assert (out["input_ids"][~chosen] == batch["input_ids"][~chosen]).all()


def test_special_and_padding_tokens_are_never_masked(tokenizer):
    batch = batch_of(tokenizer, rows=500)
    out = mask_tokens(batch, keys(500, seed=1), tokenizer, 0.5)
    special = batch["special_tokens_mask"] == 1
    assert special.any() and (full_targets(out)[1][special] == 0).all()
    padding = batch["input_ids"] == tokenizer.pad_token_id
    assert (out["attention_mask"][padding] == 0).all() and (out["attention_mask"][~padding] == 1).all()


def test_masking_is_deterministic_and_independent_of_the_host_split(tokenizer):
    batch, row_keys = batch_of(tokenizer, rows=16), keys(16, seed=7)
    whole = mask_tokens(batch, row_keys, tokenizer, 0.15)
    again = mask_tokens(batch, row_keys, tokenizer, 0.15)
    # Three hosts, each masking only its rows with their keys.
    pieces = [mask_tokens(take(batch, rows), row_keys[rows], tokenizer, 0.15)
              for rows in (slice(0, 5), slice(5, 11), slice(11, 16))]
    other = mask_tokens(batch, keys(16, seed=8), tokenizer, 0.15)
    for key in whole:
        assert (whole[key] == again[key]).all()
        assert (np.concatenate([p[key] for p in pieces]) == whole[key]).all()
    assert (other["weights"] != whole["weights"]).any()


def test_a_row_is_masked_by_its_key_alone(tokenizer):
    """Rows with their keys, put in other places of a batch of other rows (row 3 at position 7...), are masked
    exactly as before; with other keys, not."""
    batch, row_keys = batch_of(tokenizer, rows=16), keys(16, seed=7)
    whole = mask_tokens(batch, row_keys, tokenizer, 0.15)
    rows = np.array([9, 12, 0, 1, 15, 14, 2, 3, 10])
    elsewhere = mask_tokens(take(batch, rows), row_keys[rows], tokenizer, 0.15)
    for key in whole:
        np.testing.assert_array_equal(elsewhere[key], whole[key][rows])
    moved = mask_tokens(take(batch, rows), keys(16, seed=9)[rows], tokenizer, 0.15)
    assert (moved["weights"] != whole["weights"][rows]).any()


def test_the_head_sees_every_masked_token_and_a_row_never_more_than_max_predictions(tokenizer):
    assert run_mlm_flax.max_predictions(128, 0.15) == 48  # P(more than 48 of 128 masked) < 1e-9
    assert run_mlm_flax.max_predictions(16, 0.15) == 16  # never more than the length
    batch = batch_of(tokenizer, rows=64)
    limit = run_mlm_flax.max_predictions(32, 0.15)
    out = mask_tokens(batch, keys(64, seed=3), tokenizer, 0.15, limit)
    assert out["positions"].shape == (64, limit)
    labels, weights = full_targets(out)
    masked = (out["input_ids"] != batch["input_ids"]) | (weights > 0)
    assert (weights[masked] == 1).all() and (labels[masked] == batch["input_ids"][masked]).all()
    # Capped: only the first `predictions` masked tokens of a row are masked; the others keep their ids.
    capped = mask_tokens(batch, keys(64, seed=3), tokenizer, 0.9, predictions=4)
    full = mask_tokens(batch, keys(64, seed=3), tokenizer, 0.9)
    assert (capped["weights"].sum(1) <= 4).all() and (full["weights"].sum(1) > 4).any()
    np.testing.assert_array_equal(capped["positions"], full["positions"][:, :4])
    dropped = (full_targets(full)[1] > 0) & (full_targets(capped)[1] == 0)
    assert dropped.any() and (capped["input_ids"][dropped] == batch["input_ids"][dropped]).all()

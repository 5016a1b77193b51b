"""The 80/10/10 masking collator of run_mlm_flax.py."""

import numpy as np
import pytest

import run_mlm_flax
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


def test_masking_rate_and_80_10_10_split(tokenizer):
    batch = batch_of(tokenizer, rows=2000)
    out = run_mlm_flax.mask_tokens(batch, np.random.default_rng(0), slice(None), tokenizer, 0.15)
    maskable = batch["special_tokens_mask"] == 0
    chosen = out["weights"] > 0
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.01
    replaced = out["input_ids"][chosen] == tokenizer.mask_token_id
    kept = out["input_ids"][chosen] == batch["input_ids"][chosen]
    assert abs(replaced.mean() - 0.8) < 0.02
    assert abs(kept.mean() - 0.1) < 0.02  # (a random token equal to the original counts as kept: rare)
    assert (out["labels"] == batch["input_ids"]).all()
    # Unchosen positions are untouched.
    assert (out["input_ids"][~chosen] == batch["input_ids"][~chosen]).all()


def test_special_and_padding_tokens_are_never_masked(tokenizer):
    batch = batch_of(tokenizer, rows=500)
    out = run_mlm_flax.mask_tokens(batch, np.random.default_rng(1), slice(None), tokenizer, 0.5)
    special = batch["special_tokens_mask"] == 1
    assert special.any() and (out["weights"][special] == 0).all()
    padding = batch["input_ids"] == tokenizer.pad_token_id
    assert (out["attention_mask"][padding] == 0).all() and (out["attention_mask"][~padding] == 1).all()


def test_masking_is_deterministic_and_independent_of_the_host_split(tokenizer):
    batch = batch_of(tokenizer, rows=16)
    whole = run_mlm_flax.mask_tokens(batch, np.random.default_rng(7), slice(None), tokenizer, 0.15)
    again = run_mlm_flax.mask_tokens(batch, np.random.default_rng(7), slice(None), tokenizer, 0.15)
    halves = [run_mlm_flax.mask_tokens(batch, np.random.default_rng(7), rows, tokenizer, 0.15)
              for rows in (slice(0, 8), slice(8, 16))]
    other = run_mlm_flax.mask_tokens(batch, np.random.default_rng(8), slice(None), tokenizer, 0.15)
    for key in whole:
        assert (whole[key] == again[key]).all()
        assert (np.concatenate([h[key] for h in halves]) == whole[key]).all()
    assert (other["weights"] != whole["weights"]).any()

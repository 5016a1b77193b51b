"""Loads the demo's trained model the way a transformers (PyTorch) user would, compares its perplexity with a model
of token frequencies alone, and fills in a few masks.

    python demo/check.py demo/work/run demo/work/corpus.txt
"""

import collections
import json
import math
import os
import sys

from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

SENTENCES = ["See help(type(self)) for accurate <mask>.", "__init__(self, /, *args, **<mask>)",
             "Return True if the path is a <mask>.", "Raise ValueError if the <mask> is empty.",
             "Return a new <mask> object."]


def unigram_perplexity(corpus: str, tokenizer, validation_percent: int = 5) -> float:
    """Perplexity on the validation lines (the first 5%, as run_mlm_flax.py splits them) of a model that knows only
    how frequent each token is in the training lines (add-one smoothed): the least a masked LM must beat to have
    learned anything from context."""
    with open(corpus) as f:
        lines = f.read().splitlines()
    cut = len(lines) * validation_percent // 100

    def tokens(part):
        return [t for ids in tokenizer(part, add_special_tokens=False)["input_ids"] for t in ids]

    counts, held_out = collections.Counter(tokens(lines[cut:])), tokens(lines[:cut])
    total = sum(counts.values()) + len(tokenizer)
    return math.exp(-sum(math.log((counts[t] + 1) / total) for t in held_out) / len(held_out))


if __name__ == "__main__":
    run = sys.argv[1] if len(sys.argv) > 1 else "demo/work/run"
    corpus = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(run), "corpus.txt")
    with open(os.path.join(run, "eval_results.json")) as f:
        results = json.load(f)
    print("eval results:", json.dumps(results, indent=1))
    model = AutoModelForMaskedLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    print(f"\nPerplexity on the masked tokens of the validation lines: {results['eval_perplexity']:.1f}. A model of "
          f"token frequencies alone: {unigram_perplexity(corpus, tokenizer):.1f}; an untrained one: about the "
          f"vocabulary size, {len(tokenizer)}.\n")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")
    best = set()
    for sentence in SENTENCES:
        guesses = fill(sentence, top_k=3)
        best.add(guesses[0]["token_str"].strip())
        print(f"{sentence:45s} -> " + ", ".join(f"{g['token_str'].strip()!r} ({g['score']:.2f})" for g in guesses))
    print(f"{len(best)} different first guesses for {len(SENTENCES)} sentences.")
    print(f"\nThe PyTorch model loaded from {run} ({sum(p.numel() for p in model.parameters()):,} parameters).")
    print(f"Training curves: tensorboard --logdir {run}   Checkpoints: {run}/checkpoints   "
          f"Log: {run}/log_history.jsonl")

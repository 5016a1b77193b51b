"""Loads the demo's trained model the way a transformers (PyTorch) user would, and fills in a few masks.

    python demo/check.py demo/work/run
"""

import json
import os
import sys

from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

SENTENCES = ["Return a new <mask> object.", "See help(type(self)) for accurate <mask>.",
             "Raise ValueError if the <mask> is empty."]

if __name__ == "__main__":
    run = sys.argv[1] if len(sys.argv) > 1 else "demo/work/run"
    with open(os.path.join(run, "eval_results.json")) as f:
        print("eval results:", json.dumps(json.load(f), indent=1))
    model = AutoModelForMaskedLM.from_pretrained(run)
    tokenizer = AutoTokenizer.from_pretrained(run)
    print(f"(an untrained model's perplexity is about the vocabulary size, {len(tokenizer)}; a few minutes on a CPU "
          "teach it mostly which tokens are frequent: real pretraining takes many thousands of steps)")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device="cpu")
    for sentence in SENTENCES:
        guesses = ", ".join(f"{g['token_str'].strip()!r} ({g['score']:.2f})" for g in fill(sentence, top_k=3))
        print(f"{sentence:45s} -> {guesses}")
    print(f"\nThe PyTorch model loaded from {run} ({sum(p.numel() for p in model.parameters()):,} parameters).")
    print(f"Training curves: tensorboard --logdir {run}   Checkpoints: {run}/checkpoints   "
          f"Log: {run}/log_history.jsonl")

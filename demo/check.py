"""Loads the demo's trained model the way a transformers (PyTorch) user would and shows what it learned: on held-out
lines of code, one whole word masked in each, how often its first guess is the word, next to a model of word
frequencies alone; then some of those lines with its guesses, and its perplexity next to a model of token
frequencies.

    python demo/check.py demo/work/run demo/work/corpus.txt
"""

import collections
import json
import keyword
import math
import os
import random
import sys

VALIDATION_PERCENT = 5  # run_mlm_flax.py's --validation_split_percentage: the first 5% of the lines, never trained on


def split_lines(corpus: str, validation_percent: int = VALIDATION_PERCENT):
    """(held-out lines, training lines), cut as run_mlm_flax.py cuts a --train_file (one row per "\\n" line)."""
    with open(corpus) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    cut = round(len(lines) * validation_percent / 100)
    return lines[:cut], lines[cut:]


def whole_words(line: str, offsets) -> list:
    """Indices of the tokens that are a whole word of the line by themselves: a name or keyword, not part of a
    longer one (`self` in `(self,`, not `load` in `load_module`). offsets: the tokens' (start, end) characters."""
    def is_word_char(i):
        return 0 <= i < len(line) and (line[i].isalnum() or line[i] == "_")

    return [i for i, (start, end) in enumerate(offsets)
            if end > start and line[start:end].isidentifier() and any(c.isalpha() for c in line[start:end])
            and not is_word_char(start - 1) and not is_word_char(end)]


def python_keywords(line: str, offsets) -> list:
    """The whole words (whole_words) that are Python keywords: def, return, if, in, not, None, ..."""
    return [i for i in whole_words(line, offsets) if keyword.iskeyword(line[offsets[i][0]:offsets[i][1]])]


def word_counts(tokenizer, lines, words=whole_words) -> collections.Counter:
    """How often each token id is a whole word (`words`: whole_words or python_keywords) in lines."""
    encoded = tokenizer(lines, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return collections.Counter(ids[i] for line, ids, offsets in zip(lines, encoded["input_ids"],
                                                                    encoded["offset_mapping"])
                               for i in words(line, offsets))


def cloze_items(tokenizer, lines, seed: int = 0, words=whole_words):
    """One cloze per line that has a whole word (`words`: whole_words or python_keywords): (token ids with <s> and
    </s>, the masked position, the word's token id), the word drawn at random from the line's."""
    rng, items = random.Random(seed), []
    encoded = tokenizer(lines, return_offsets_mapping=True, truncation=True)
    for line, ids, offsets in zip(lines, encoded["input_ids"], encoded["offset_mapping"]):
        words_here = words(line, offsets)
        if words_here:
            position = rng.choice(words_here)
            items.append((ids, position, ids[position]))
    return items


def cloze_guesses(model, tokenizer, items, batch_size: int = 256) -> list:
    """The model's first guess (a token id) for each item's masked word."""
    import torch

    guesses = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        length = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id)
        for row, (ids, position, _) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            input_ids[row, position] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long()).logits
        guesses += [int(logits[row, position].argmax()) for row, (_, position, _) in enumerate(chunk)]
    return guesses


def unigram_perplexity(tokenizer, held_out, training, vocab_size: int) -> float:
    """Perplexity on the held-out lines of a model that knows only how frequent each token is in the training lines
    (add-one smoothed): the least a masked LM must beat to have learned anything from context."""
    def tokens(lines):
        # verbose=False: lines are not model inputs here, their length does not matter
        return [t for ids in tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"] for t in ids]

    counts, held_out_tokens = collections.Counter(tokens(training)), tokens(held_out)
    total = sum(counts.values()) + vocab_size
    return math.exp(-sum(math.log((counts[t] + 1) / total) for t in held_out_tokens) / len(held_out_tokens))


def show(tokenizer, ids, position, token) -> str:
    """The line with the masked word in [brackets]: [guess] where right, [guess -> word] where wrong."""
    word = tokenizer.decode([ids[position]]).strip()
    guess = tokenizer.decode([token]).strip()
    shown = f"[{guess}]" if token == ids[position] else f"[{guess} -> {word}]"
    before, after = tokenizer.decode(ids[1:position]), tokenizer.decode(ids[position + 1:-1])
    space = " " if tokenizer.convert_ids_to_tokens(ids[position]).startswith("\u0120") else ""
    return f"{before}{space}{shown}{after}"


def main(run: str, corpus: str, examples: int = 12):
    import transformers
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # loading a model this small takes no time to watch

    with open(os.path.join(run, "eval_results.json")) as f:
        results = json.load(f)
    model = AutoModelForMaskedLM.from_pretrained(run).eval()
    tokenizer = AutoTokenizer.from_pretrained(run)
    held_out, training = split_lines(corpus)

    scores = {}
    for words, what in ((whole_words, "a name or keyword that is one token"),
                        (python_keywords, "a Python keyword: def, return, if, in, not, None, ...")):
        items = cloze_items(tokenizer, held_out, words=words)
        guesses = cloze_guesses(model, tokenizer, items)
        right = [guess == answer for guess, answer in zip(guesses, (answer for _, _, answer in items))]
        frequent, _ = word_counts(tokenizer, training, words).most_common(1)[0]
        unigram_right = sum(answer == frequent for _, _, answer in items)
        print(f"\nCloze on {len(items)} held-out lines of code (never trained on), one word of each masked ({what}, "
              f"drawn at random):")
        print(f"  the model's first guess is the word:         {sum(right) / len(items):6.1%}")
        print(f"  always guessing the most frequent one "
              f"({tokenizer.decode([frequent]).strip()!r}): {unigram_right / len(items):6.1%}")
        scores[words] = items, guesses, right
    items, guesses, right = scores[whole_words]

    print(f"\n{examples} of them, the model's guess in [brackets] (-> the word, where it is wrong):")
    for k in random.Random(1).sample(range(len(items)), min(examples, len(items))):
        ids, position, _ = items[k]
        print(f"  {'right' if right[k] else 'wrong'}  {show(tokenizer, ids, position, guesses[k])}")

    print(f"\nPerplexity on the masked tokens of the held-out lines (eval_results.json): "
          f"{results['eval_perplexity']:.1f}; a model of token frequencies alone: "
          f"{unigram_perplexity(tokenizer, held_out, training, len(tokenizer)):.1f}; an untrained one: about the "
          f"vocabulary size, {len(tokenizer)}.")
    print(f"\nThe PyTorch model loaded from {run} ({sum(p.numel() for p in model.parameters()):,} parameters).")
    print(f"Training curves: tensorboard --logdir {run}   Checkpoints: {run}/checkpoints   "
          f"Log: {run}/log_history.jsonl")


if __name__ == "__main__":
    run = sys.argv[1] if len(sys.argv) > 1 else "demo/work/run"
    main(run, sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(run), "corpus.txt"))

"""Builds the demo's corpus, tokenizer and model config with no network.

The corpus is the source code of Python's own standard library, which every Python installation carries: its lines
of code, with comments and docstrings left out and written out again by `ast.unparse` (one spacing and quoting
style). Code is full of structure that a small model learns in minutes (`def f(self, ...)`, `for x in ...`,
`if x is None:`, names that recur within a line), so the demo shows learning, not only a falling loss. A byte-level
BPE tokenizer is trained on it and saved with a small RoBERTa config, exactly as in the README's recipe for your own
language.

    python demo/prepare.py demo/work
"""

import ast
import os
import random
import sys
import sysconfig

# Not plain library code: tests, codec tables, demos, the IDE and its GUI toolkit.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
        "ensurepip", "distutils", "encodings"}
SKIP_DIRS = {"test", "tests", "idle_test"}


def stdlib_files():
    """The .py files of the standard library's public modules and packages, in a fixed order."""
    lib = sysconfig.get_paths()["stdlib"]
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        if os.path.isfile(os.path.join(lib, name + ".py")):
            yield os.path.join(lib, name + ".py")
        for root, dirs, files in os.walk(os.path.join(lib, name)):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            yield from (os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))


class DropDocstrings(ast.NodeTransformer):
    """Docstrings are prose (the tokens a small model learns last); the demo keeps the code."""

    def generic_visit(self, node):
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        return node


def code_lines(path):
    """The file's statements as ast.unparse writes them (comments gone), unindented; none if it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    return [line.strip() for line in ast.unparse(DropDocstrings().visit(tree)).splitlines()]


def build_corpus(path, min_words=3, max_chars=100):
    """Writes the distinct code lines of min_words words or more and at most max_chars characters (long literal
    tables are not what the demo is about), shuffled with a fixed seed; returns how many."""
    # isprintable: one line of the file is one row of the training script's text loader, which splits at "\n" alone
    lines = [line for file in stdlib_files() for line in code_lines(file)
             if len(line.split()) >= min_words and len(line) <= max_chars and line.isascii() and line.isprintable()]
    lines = list(dict.fromkeys(lines))  # `return self`, `raise NotImplementedError` and the like recur everywhere
    random.Random(0).shuffle(lines)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def build_tokenizer_and_config(corpus, model_dir, vocab_size=2048, max_length=32):
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import AutoConfig, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([corpus], vocab_size=vocab_size, min_frequency=2,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")),
                                                      ("<s>", bpe.token_to_id("<s>")))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                        model_max_length=max_length)
    tokenizer.save_pretrained(model_dir)
    # No dropout: the demo sees each line about once, there is nothing to overfit yet, and dropout slows learning.
    AutoConfig.for_model("roberta", vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=512, max_position_embeddings=max_length + 2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=1,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2).save_pretrained(model_dir)


if __name__ == "__main__":
    work = sys.argv[1] if len(sys.argv) > 1 else "demo/work"
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.txt")
    n = build_corpus(corpus)
    model_dir = os.path.join(work, "my-roberta")
    build_tokenizer_and_config(corpus, model_dir)
    print(f"corpus: {corpus} ({n} lines of Python's standard library code); tokenizer and config: {model_dir}")

"""Builds the demo's corpus, tokenizer and model config with no network.

The corpus is the help text of Python's own standard library (what `help(module)` prints), which every Python
installation carries: real English prose with code. A byte-level BPE tokenizer is trained on it and saved with a
small RoBERTa config, exactly as in the README's recipe for your own language.

    python demo/prepare.py demo/work
"""

import importlib
import os
import pydoc
import random
import re
import sys
import warnings

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "xxsubtype"}
MODULES = sorted(name for name in sys.stdlib_module_names if not name.startswith("_") and name not in SKIP)


def help_texts():
    for name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
            yield pydoc.render_doc(module, renderer=pydoc.plaintext)
        except Exception:  # some modules need a display or a platform we do not have
            continue


def build_corpus(path, max_lines=60000):
    lines = []
    for text in help_texts():
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line).strip(" |")
            if len(line.split()) >= 4:
                lines.append(line)
    lines = list(dict.fromkeys(lines))  # "Methods inherited from ..." and the like repeat in every module
    random.Random(0).shuffle(lines)
    with open(path, "w") as f:
        f.write("\n".join(lines[:max_lines]) + "\n")
    return min(len(lines), max_lines)


def build_tokenizer_and_config(corpus, model_dir, vocab_size=4000, max_length=64):
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
    AutoConfig.for_model("roberta", vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                         num_attention_heads=4, intermediate_size=512, max_position_embeddings=max_length + 2,
                         type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2).save_pretrained(model_dir)


if __name__ == "__main__":
    work = sys.argv[1] if len(sys.argv) > 1 else "demo/work"
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.txt")
    n = build_corpus(corpus)
    model_dir = os.path.join(work, "my-roberta")
    build_tokenizer_and_config(corpus, model_dir)
    print(f"corpus: {corpus} ({n} lines of Python's help texts); tokenizer and config: {model_dir}")

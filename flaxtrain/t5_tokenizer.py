"""Trains a T5-style SentencePiece Unigram tokenizer on local text, with no sentencepiece package and no network.

    python -m flaxtrain.t5_tokenizer corpus.txt [more.txt ...] --output_dir ./my-t5 --vocab_size 32000

The layout copies T5's: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, then the learned pieces, then the sentinels
`<extra_id_{extra_ids-1}>` .. `<extra_id_0>` (so `<extra_id_0>` is the last id, as in T5's vocabulary; code should
still look sentinels up by token). Every encoded text ends in `</s>`. `vocab_size` counts the three special tokens
but not the sentinels (T5's 32000 + 100). The directory loads with `AutoTokenizer` (the saved pipeline as is) and
`T5TokenizerFast` (transformers 5 rebuilds T5's pipeline around the saved vocabulary: the same ids and splits, but
without the NFKC normalization, so only text with compatibility characters such as full-width letters differs).
"""

import argparse
import logging

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5


def sentinel_tokens(extra_ids: int) -> list[str]:
    """`<extra_id_0>` .. `<extra_id_{extra_ids-1}>`."""
    return [f"<extra_id_{i}>" for i in range(extra_ids)]


def train_t5_tokenizer(files, output_dir, vocab_size=32000, extra_ids=100, model_max_length=512):
    """Trains on the text `files` (paths), saves to `output_dir` and returns it as AutoTokenizer loads it."""
    from tokenizers import SentencePieceUnigramTokenizer, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    files = [files] if isinstance(files, str) else [str(f) for f in files]
    unigram = SentencePieceUnigramTokenizer()
    # T5Tokenizer's own pipeline (split on whitespace, "▁" before every word), so that T5TokenizerFast, which
    # rebuilds the pipeline around our vocabulary, splits text the same way; plus NMT+NFKC normalization, which T5
    # gets from its sentencepiece charsmap (that T5TokenizerFast cannot rebuild: it skips it).
    unigram.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC()])
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    unigram.train(files, vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>",
                  show_progress=False)
    if unigram.get_vocab_size() < vocab_size:
        logger.warning("The text gave only %d pieces of the %d asked for.", unigram.get_vocab_size(), vocab_size)
    # Added in reverse so that <extra_id_0> gets the highest id, as in T5's own vocabulary.
    unigram.add_special_tokens(sentinel_tokens(extra_ids)[::-1])
    eos = unigram.token_to_id("</s>")
    unigram.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                special_tokens=[("</s>", eos)])

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=unigram._tokenizer, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=sentinel_tokens(extra_ids),
                                        model_max_length=model_max_length, extra_ids=extra_ids)
    tokenizer.save_pretrained(output_dir)
    return AutoTokenizer.from_pretrained(output_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="plain-text files to train on")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=32000, help="pieces, counting <pad> </s> <unk>")
    parser.add_argument("--extra_ids", type=int, default=100, help="sentinel tokens <extra_id_N>")
    parser.add_argument("--model_max_length", type=int, default=512)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    tokenizer = train_t5_tokenizer(args.files, args.output_dir, args.vocab_size, args.extra_ids,
                                   args.model_max_length)
    logger.info("Saved a tokenizer of %d tokens to %s", len(tokenizer), args.output_dir)


if __name__ == "__main__":
    main()

"""demo/check.py's cloze: which tokens count as whole words, which lines are held out, how guesses are scored."""

import pytest

from demo import check
from flaxtrain import data, settings

LINE = "def load_module(self, fqname): return x1 + _"
# (start, end) of each token as a byte-level BPE tokenizer gives them (spaces trimmed)
OFFSETS = [(0, 3), (4, 8), (8, 9), (9, 15), (15, 16), (16, 20), (20, 21), (22, 28), (28, 30), (31, 37), (38, 40),
           (41, 42), (43, 44)]


def test_a_whole_word_is_a_name_not_part_of_a_longer_one():
    words = [LINE[slice(*OFFSETS[i])] for i in check.whole_words(LINE, OFFSETS)]
    # not load or module (load_module), not "_" (no letter), not "x" where the token is "x" of "x1"
    assert words == ["def", "self", "fqname", "return", "x1"]
    assert check.whole_words(LINE, [(0, 0), (41, 42), (38, 39)]) == []  # special token, "+", the "x" of "x1"
    assert [LINE[slice(*OFFSETS[i])] for i in check.python_keywords(LINE, OFFSETS)] == ["def", "return"]


def test_held_out_lines_are_the_ones_the_training_script_holds_out(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}\n" for i in range(70)))  # 5% of 70 is 3.5: the cut must round as data's
    raw = data.load_raw_datasets(settings.DataSource(train_file=str(corpus)), True, True)
    held_out, training = check.split_lines(str(corpus))
    assert held_out == raw["validation"]["text"] and training == raw["train"]["text"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = ["if self.name is None:", "for item in self.items:", "return self.value", "x = len(items) + 1",
            "if self.name is name:", "if self_name is 1:"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    from tokenizers.processors import RobertaProcessing
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


class Oracle:
    """A stand-in masked LM whose first guess at each row's <mask> is the token it is told: it checks that each
    row has exactly one mask, at the item's position, and the row's other tokens untouched."""

    def __init__(self, items, guesses, mask_id, pad_id):
        self.items, self.guesses, self.mask_id, self.pad_id, self.seen = items, guesses, mask_id, pad_id, 0

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = torch.zeros(*input_ids.shape, 400)
        for row in range(len(input_ids)):
            ids, position, _ = self.items[self.seen]
            expected = list(ids)
            expected[position] = self.mask_id
            assert input_ids[row, :len(ids)].tolist() == expected
            assert (input_ids[row, len(ids):] == self.pad_id).all()
            assert attention_mask[row].sum() == len(ids)
            logits[row, position, self.guesses[self.seen]] = 1.0
            self.seen += 1
        return type("Output", (), {"logits": logits})


def test_cloze_masks_one_whole_word_a_line_and_scores_the_first_guess(tokenizer):
    lines = ["if self.name is None:", "for item in self.items:", "(1, 2)", "return self.value"]
    items = check.cloze_items(tokenizer, lines)
    assert len(items) == 3  # "(1, 2)" has no word to mask
    for ids, position, answer in items:
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id and ids[position] == answer
        assert tokenizer.decode([answer]).strip().isidentifier()
    wanted = [items[0][2], tokenizer.mask_token_id, items[2][2]]
    oracle = Oracle(items, wanted, tokenizer.mask_token_id, tokenizer.pad_token_id)
    guesses = check.cloze_guesses(oracle, tokenizer, items, batch_size=2)  # two batches, the second of one row
    assert guesses == wanted and oracle.seen == 3
    assert check.cloze_items(tokenizer, lines) == items  # the same words each time: a fixed seed


def test_word_counts_count_whole_words_only(tokenizer):
    counts = check.word_counts(tokenizer, ["if self.name is name:", "if self_name is 1:"])
    words = {tokenizer.convert_ids_to_tokens(t): n for t, n in counts.items()}
    # "name" of self_name is not a word; " name" is a token of its own; a number is no word
    assert words == {"if": 2, "\u0120self": 1, "name": 1, "\u0120is": 2, "\u0120name": 1}


def test_unigram_perplexity_of_unseen_and_of_seen_tokens(tokenizer):
    unseen, seen = ["self.name"], ["for item in items"]
    assert not set(tokenizer(unseen)["input_ids"][0][1:-1]) & set(tokenizer(seen)["input_ids"][0][1:-1])
    # every held-out token has the add-one probability 1 / (training tokens + vocabulary)
    total = len(tokenizer(seen, add_special_tokens=False)["input_ids"][0]) + 300
    assert check.unigram_perplexity(tokenizer, unseen, seen, 300) == pytest.approx(total)
    assert check.unigram_perplexity(tokenizer, unseen, unseen * 50, 300) < 10

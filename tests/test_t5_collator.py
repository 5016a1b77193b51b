"""T5 span corruption (the data section of run_t5_mlm_flax.py) and the T5 tokenizer trainer."""

import itertools

import numpy as np
import pytest

import run_t5_mlm_flax as t5mlm
from flaxtrain import example_rng, t5_tokenizer

GRID = list(itertools.product((0.05, 0.15, 0.3, 0.5), (1, 2, 3, 5, 8), (32, 64, 128, 512)))
PAD, EOS = 0, 1
SENTINELS = np.arange(1000, 1300)  # enough for the most spans in GRID (255: density 0.5, mean 1, 512 tokens)


def write_corpus(path, lines=600, seed=0):
    """Made-up words of made-up syllables: enough variety for a Unigram vocabulary of a few hundred pieces."""
    rng = np.random.default_rng(seed)
    syllables = "ka lo mi ne ru ta shi po gen dar vel tor quin zu ba fe".split()
    words = ["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(1000)]
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(" ".join(rng.choice(words, rng.integers(4, 20))) + ".\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    work = tmp_path_factory.mktemp("t5tok")
    t5_tokenizer.train_t5_tokenizer([write_corpus(work / "corpus.txt")], work / "tok", vocab_size=400)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(work / "tok")


def raw_text(rows, length, seed=0):
    """[rows, length] token ids below the sentinels, with pad (0) and EOS (1) in the text, as real chunks have."""
    return np.random.default_rng(seed).integers(0, 50, (rows, length))


def keys(rows, seed=0):
    """Example keys of rows 0 .. rows-1 as training keys them (seed, 2, epoch 0, index)."""
    return example_rng.keys(seed, 2, 0, np.arange(rows))


def corrupt(ids, seed, density, mean, inputs_length, targets_length, sentinels=SENTINELS, row_keys=None):
    """span_corrupt of `ids` with the keys of rows 0 .. len(ids)-1 of `seed` (or `row_keys`)."""
    row_keys = keys(len(ids), seed) if row_keys is None else row_keys
    return t5mlm.span_corrupt(ids, row_keys, sentinels, EOS, PAD, density, mean, inputs_length, targets_length)


def reconstruct(out, row, sentinels):
    """The raw chunk back from row `row`: each sentinel of the inputs is replaced by what follows it in the labels.
    Also returns the sentinels of the inputs and of the labels, in order."""
    inputs = out["input_ids"][row, :out["attention_mask"][row].sum() - 1]  # real tokens, without the EOS
    labels = out["labels"][row, :int(out["weights"][row].sum()) - 1]
    assert out["input_ids"][row, len(inputs)] == EOS and out["labels"][row, len(labels)] == EOS
    assert labels[0] in sentinels
    spans, key = {}, None
    for token in labels:
        if token in sentinels:
            key, spans[token] = token, []
        else:
            spans[key].append(token)
    text = [t for token in inputs for t in (spans[token] if token in sentinels else [token])]
    return text, [t for t in inputs if t in sentinels], [t for t in labels if t in sentinels]


def test_lengths_match_the_original_for_the_usual_settings():
    assert t5mlm.compute_input_and_target_lengths(512, 0.15, 3) == (568, 114)
    assert t5mlm.compute_input_and_target_lengths(128, 0.15, 3) == (141, 29)


@pytest.mark.parametrize("density,mean,inputs_length", GRID)
def test_exact_shapes_sentinels_and_reconstruction(density, mean, inputs_length):
    raw_length, targets_length = t5mlm.compute_input_and_target_lengths(inputs_length, density, mean)
    real_inputs, real_targets = t5mlm.corrupted_lengths(raw_length, density, mean)
    # The longest chunk that fits; one token short only where no chunk length gives inputs_length exactly.
    assert real_targets == targets_length and real_inputs in (inputs_length, inputs_length - 1)
    assert t5mlm.corrupted_lengths(raw_length + 1, density, mean)[0] > inputs_length
    if real_inputs < inputs_length:
        assert t5mlm.corrupted_lengths(raw_length + 1, density, mean)[0] == inputs_length + 1

    ids = raw_text(6, raw_length, seed=inputs_length)
    out = corrupt(ids, 0, density, mean, inputs_length, targets_length)
    for key in ("input_ids", "attention_mask"):
        assert out[key].shape == (6, inputs_length) and out[key].dtype == np.int32
    for key in ("labels", "decoder_input_ids", "weights"):
        assert out[key].shape == (6, targets_length)
    assert (out["weights"] == 1).all() and (out["attention_mask"].sum(1) == real_inputs).all()
    assert (out["input_ids"][:, real_inputs:] == PAD).all()
    assert (out["decoder_input_ids"][:, 0] == PAD).all()
    assert (out["decoder_input_ids"][:, 1:] == out["labels"][:, :-1]).all()

    num_spans = t5mlm.noise_span_counts(raw_length, density, mean)[1]
    for row in range(6):
        text, input_sentinels, label_sentinels = reconstruct(out, row, set(SENTINELS.tolist()))
        assert text == ids[row].tolist()
        assert input_sentinels == label_sentinels == SENTINELS[:num_spans].tolist()


@pytest.mark.parametrize("density,mean,inputs_length", GRID)
def test_noise_fraction_and_spans(density, mean, inputs_length):
    raw_length, _ = t5mlm.compute_input_and_target_lengths(inputs_length, density, mean)
    num_noise, num_spans = t5mlm.noise_span_counts(raw_length, density, mean)
    mask = t5mlm.random_spans_noise_mask(raw_length, density, mean, keys(200))
    assert mask.shape == (200, raw_length) and (mask.sum(1) == num_noise).all()
    assert abs(num_noise / raw_length - density) <= 0.5 / raw_length + 1e-9
    starts = mask & ~np.pad(mask, ((0, 0), (1, 0)))[:, :-1]
    assert (starts.sum(1) == num_spans).all()  # non-empty spans, none merged
    assert (~mask[:, 0]).all() and mask[:, -1].all()  # non-noise first, noise last, as T5
    single = t5mlm.random_spans_noise_mask(raw_length, density, mean, keys(200)[7:8])
    assert single.shape == (1, raw_length) and (single[0] == mask[7]).all()


def test_spans_have_random_lengths_and_places():
    mask = t5mlm.random_spans_noise_mask(568, 0.15, 3, keys(400, seed=1))
    lengths = [len(list(group)) for row in mask[:100] for noisy, group in itertools.groupby(row) if noisy]
    assert abs(np.mean(lengths) - 85 / 28) < 1e-9 and max(lengths) > 6  # 85 noise tokens in 28 spans of any length
    # Away from the ends (the mask starts with non-noise and ends with noise) any token is noise about as often.
    assert abs(mask[:, 20:-20].mean(0) - 85 / 568).max() < 0.07


def test_every_cut_into_spans_is_equally_likely():
    """10 tokens, 3 of them noise in 2 spans: the 7 non-noise tokens cut in 2 (6 ways) times the noise cut in 2 (2
    ways) gives 12 masks, each drawn as often (chi-squared, 11 degrees of freedom, below its 99.9% point)."""
    assert t5mlm.noise_span_counts(10, 0.3, 1.5) == (3, 2)
    mask = t5mlm.random_spans_noise_mask(10, 0.3, 1.5, keys(12_000))
    _, counts = np.unique(mask, axis=0, return_counts=True)
    assert len(counts) == 12
    assert ((counts - 1000) ** 2 / 1000).sum() < 31.3


def test_deterministic_and_independent_of_the_host_split():
    raw_length, targets_length = t5mlm.compute_input_and_target_lengths(64, 0.15, 3)
    ids = raw_text(8, raw_length)
    whole = corrupt(ids, 7, 0.15, 3, 64, targets_length)
    again = corrupt(ids, 7, 0.15, 3, 64, targets_length)
    # Three hosts, each corrupting only its rows with their keys.
    pieces = [corrupt(ids[rows], 7, 0.15, 3, 64, targets_length, row_keys=keys(8, 7)[rows])
              for rows in (slice(0, 3), slice(3, 4), slice(4, 8))]
    other = corrupt(ids, 8, 0.15, 3, 64, targets_length)
    for key in whole:
        assert (whole[key] == again[key]).all()
        assert (np.concatenate([p[key] for p in pieces]) == whole[key]).all()
    assert (other["input_ids"] != whole["input_ids"]).any()


def test_a_row_is_corrupted_by_its_key_alone():
    """Rows with their keys, put in other places of a batch of other rows (row 3 at position 1...), are corrupted
    exactly as before; with other keys, not."""
    raw_length, targets_length = t5mlm.compute_input_and_target_lengths(64, 0.15, 3)
    ids = raw_text(8, raw_length)
    whole = corrupt(ids, 7, 0.15, 3, 64, targets_length)
    rows = np.array([6, 3, 0, 7, 2])
    elsewhere = corrupt(ids[rows], 7, 0.15, 3, 64, targets_length, row_keys=keys(8, 7)[rows])
    for key in whole:
        np.testing.assert_array_equal(elsewhere[key], whole[key][rows])
    moved = corrupt(ids[rows], 9, 0.15, 3, 64, targets_length, row_keys=keys(8, 9)[rows])
    assert (moved["input_ids"] != whole["input_ids"][rows]).any()


def test_text_of_pad_tokens_survives():
    raw_length, targets_length = t5mlm.compute_input_and_target_lengths(32, 0.3, 2)
    ids = np.zeros((4, raw_length), np.int64)
    ids[:, ::5] = 7
    out = corrupt(ids, 0, 0.3, 2, 32, targets_length)
    assert (out["weights"] == 1).all()  # pad ids in the targets are real targets
    for row in range(4):
        assert reconstruct(out, row, set(SENTINELS.tolist()))[0] == ids[row].tolist()


def test_too_few_sentinels_or_too_long_chunks_raise():
    raw_length, targets_length = t5mlm.compute_input_and_target_lengths(512, 0.5, 1)
    with pytest.raises(ValueError, match="sentinel"):
        corrupt(raw_text(2, raw_length), 0, 0.5, 1, 512, targets_length, sentinels=SENTINELS[:100])
    with pytest.raises(ValueError, match="compute_input_and_target_lengths"):
        corrupt(raw_text(2, raw_length + 3), 0, 0.5, 1, 512, targets_length)
    for bad in ((512, 0.0, 3), (512, 1.0, 3), (512, 0.15, 0.5), (2, 0.15, 3)):
        with pytest.raises(ValueError):
            t5mlm.compute_input_and_target_lengths(*bad)


def test_sentinels_are_looked_up_by_token(tokenizer, tmp_path):
    ids = t5mlm.sentinel_token_ids(tokenizer, 100)
    assert ids.tolist() == tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert ids[0] == len(tokenizer) - 1 and ids[99] == len(tokenizer) - 100  # T5's layout, not relied on
    with pytest.raises(ValueError, match=r"lacks 1 of the 101 sentinel tokens.*<extra_id_100>"):
        t5mlm.sentinel_token_ids(tokenizer, 101)
    plain = t5_tokenizer.train_t5_tokenizer([write_corpus(tmp_path / "c.txt", lines=100)], tmp_path / "plain",
                                            vocab_size=150, extra_ids=0)
    with pytest.raises(ValueError, match=f"tokenizer {str(tmp_path / 'plain')!r} lacks"):
        t5mlm.sentinel_token_ids(plain, 3)


def test_group_texts_keeps_eos_and_drops_the_tail():
    examples = {"input_ids": [[5, 6, 1], [7, 1], [8, 9, 10, 1]]}
    assert t5mlm.group_texts(examples, 4) == {"input_ids": [[5, 6, 1, 7], [1, 8, 9, 10]]}
    assert t5mlm.group_texts({"input_ids": [[5, 1]]}, 4) == {"input_ids": []}


def test_end_to_end_with_the_trained_tokenizer(tokenizer, tmp_path):
    texts = open(write_corpus(tmp_path / "text.txt", lines=80, seed=3)).read().splitlines()
    texts[3] += " <pad> x <pad>"  # C4 has such texts: they must not break the collator
    raw_length, targets_length = t5mlm.compute_input_and_target_lengths(64, 0.15, 3)
    chunks = np.array(t5mlm.group_texts(dict(tokenizer(texts, return_attention_mask=False)), raw_length)["input_ids"])
    assert (chunks == PAD).any() and (chunks == tokenizer.eos_token_id).any()
    sentinels = t5mlm.sentinel_token_ids(tokenizer, t5mlm.noise_span_counts(raw_length, 0.15, 3)[1])
    out = t5mlm.span_corrupt(chunks, keys(len(chunks)), sentinels, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             0.15, 3, 64, targets_length)
    assert out["input_ids"].shape == (len(chunks), 64) and out["labels"].shape == (len(chunks), targets_length)
    for row in range(len(chunks)):
        assert reconstruct(out, row, set(sentinels.tolist()))[0] == chunks[row].tolist()
    assert tokenizer.decode(out["labels"][0]).startswith("<extra_id_0>")


def test_trained_tokenizer_loads_as_t5(tokenizer, tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    t5_tokenizer.main([corpus, "--output_dir", str(tmp_path / "tok"), "--vocab_size", "300", "--extra_ids", "10"])
    text = "kalo  minetorzu velba ru. <extra_id_3> fe"
    for load in (AutoTokenizer.from_pretrained, T5TokenizerFast.from_pretrained):
        loaded = load(tmp_path / "tok")
        assert len(loaded) == 310 and (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
        assert loaded.convert_tokens_to_ids("<extra_id_0>") == 309
        assert loaded.convert_tokens_to_ids("<extra_id_9>") == 300
        ids = loaded(text)["input_ids"]
        assert ids[-1] == 1 and ids.count(1) == 1 and 306 in ids  # EOS appended; the sentinel is one token
        assert loaded.decode(ids, skip_special_tokens=True).split() == ["kalo", "minetorzu", "velba", "ru.", "fe"]
        assert loaded("é")["input_ids"][-2:] == [2, 1]  # a character the corpus never had: "▁", <unk>, </s>
    auto, t5 = AutoTokenizer.from_pretrained(tmp_path / "tok"), T5TokenizerFast.from_pretrained(tmp_path / "tok")
    assert auto(text)["input_ids"] == t5(text)["input_ids"]
    assert len(tokenizer) == 500 and tokenizer.model_max_length == 512

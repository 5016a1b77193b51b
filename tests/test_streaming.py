"""flaxtrain/streaming.py, the --streaming input pipeline, on small files: each host's share of the records, exact
resume from a JSON state (across passes, with and without worker processes) that does not read again what was
consumed, the file formats, errors in one line that name the file and the place, packing into blocks, and a share
without records that ends instead of looping."""

import bz2
import contextlib
import csv
import gzip
import importlib.util
import itertools
import json
import lzma
import re
import signal

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flaxtrain import text_files
from flaxtrain.streaming import TEXTS_PER_ENCODE, Blocks, host_batches
from flaxtrain.text_files import TextRecords, file_format, resolve_files

PAD = {"input_ids": 0}
LENGTH, ROWS = 16, 4


def encode(texts):
    """Character-level token ids, then 1 (end of text). At module level: Grain's worker processes unpickle it."""
    return {"input_ids": [[ord(c) for c in t] + [1] for t in texts]}


def first_four(texts):
    """At most 4 character ids a text, no end token (so that an empty text has none): truncation is encode's job."""
    return {"input_ids": [[ord(c) for c in t][:4] for t in texts]}


def corpus(folder, files, records):
    """`files` text files of `records` lines each, line r of file f reading "f.r" (each record says where it is)."""
    paths = []
    for f in range(files):
        path = folder / f"part-{f}.txt"
        path.write_text("".join(f"{f}.{r}\n" for r in range(records)))
        paths.append(str(path))
    return paths


def read(records):
    """All texts of a TextRecords, and its reader (for records_read and files_opened)."""
    reader = iter(records)
    return list(reader), reader


def reader_of(iterator):
    """The _TextRecordsIterator at the root of a chain of Grain iterators (host_batches' in-process pipeline)."""
    while not isinstance(iterator, text_files._TextRecordsIterator):
        (iterator,) = iterator._parents
    return iterator


def reader_positions(state):
    """The reader positions ({"pass", "file", "record", ...}) inside a pipeline's nested state."""
    if isinstance(state, dict):
        if {"pass", "file", "record", "offset"} <= state.keys():
            yield state
        for value in state.values():
            yield from reader_positions(value)
    elif isinstance(state, list):
        for value in state:
            yield from reader_positions(value)


def round_trip(state):
    """A state as a checkpoint holds it: written as JSON and read back."""
    return json.loads(json.dumps(state))


@contextlib.contextmanager
def deadline(seconds):
    """Fails, instead of hanging the suite, when the code under test loops without end."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: an endless loop")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------- 1. shares
def test_four_shares_of_eight_files_read_two_whole_files_each(tmp_path):
    paths = corpus(tmp_path, files=8, records=10)
    seen = []
    for index in range(4):
        texts, reader = read(TextRecords(paths).shard(index, 4))
        # files[index::4], whole and in order: nothing of any other file.
        assert texts == [f"{f}.{r}" for f in (index, index + 4) for r in range(10)]
        assert (reader.records_read, reader.files_opened) == (20, 2)  # a quarter of 80, two files opened of 8
        seen += texts
    assert sorted(seen) == sorted(f"{f}.{r}" for f in range(8) for r in range(10))  # disjoint, all together


def test_four_shares_of_two_files_read_every_fourth_record_of_each(tmp_path):
    paths = corpus(tmp_path, files=2, records=10)
    seen = []
    for index in range(4):
        texts, reader = read(TextRecords(paths).shard(index, 4))
        assert texts == [f"{f}.{r}" for f in range(2) for r in range(index, 10, 4)]
        # It passes over the other shares' records without counting them: about a quarter of 20 each.
        assert reader.records_read == len(texts) == (6 if index < 2 else 4)
        assert reader.files_opened == 2
        seen += texts
    assert sorted(seen) == sorted(f"{f}.{r}" for f in range(2) for r in range(10))  # disjoint, all together


def test_two_shares_of_three_equal_files_are_uneven(tmp_path):
    paths = corpus(tmp_path, files=3, records=10)
    (first, _), (second, _) = read(TextRecords(paths).shard(0, 2)), read(TextRecords(paths).shard(1, 2))
    assert {t.split(".")[0] for t in first} == {"0", "2"} and {t.split(".")[0] for t in second} == {"1"}
    assert (len(first), len(second)) == (20, 10), "2 shares of 3 equal files: whole files, 2 and 1, uneven"


def test_worker_slices_split_a_hosts_share_again(tmp_path):
    """set_slice (what Grain calls in each worker process) on a host's share: 2 hosts x 2 workers of one file are
    4 disjoint parts that together are the file; of 2 files, each worker of a host takes one of them whole."""
    (path,) = corpus(tmp_path, files=1, records=10)
    parts = []
    for host, worker in itertools.product(range(2), range(2)):
        records = TextRecords([path]).shard(host, 2)
        records.set_slice(slice(worker, None, 2))
        parts.append(read(records)[0])
    assert parts == [[f"0.{r}" for r in range(offset, 10, 4)] for offset in (0, 2, 1, 3)]

    (tmp_path / "two").mkdir()
    records = TextRecords(corpus(tmp_path / "two", files=2, records=5))
    records.set_slice(slice(1, None, 2))
    assert read(records)[0] == [f"1.{r}" for r in range(5)]


def test_each_pass_reads_the_whole_share_its_files_in_an_order_drawn_from_the_seed(tmp_path):
    paths = corpus(tmp_path, files=6, records=2)

    def file_orders(seed):
        texts = read(TextRecords(paths, passes=4, seed=seed))[0]
        orders = [[t.split(".")[0] for t in texts[i:i + 12:2]] for i in range(0, 48, 12)]
        assert texts == [f"{f}.{r}" for order in orders for f in order for r in range(2)]  # whole files, in turn
        assert all(sorted(order) == [str(f) for f in range(6)] for order in orders)  # every file once a pass
        return orders

    unseeded, seeded = file_orders(None), file_orders(5)
    assert unseeded[0] == [str(f) for f in range(6)]  # without a seed, the first pass in the order given
    assert len({tuple(order) for order in unseeded[1:]}) == 3  # then another order each pass
    assert seeded[0] != unseeded[0] and len({tuple(order) for order in seeded}) == 4
    assert file_orders(5) == seeded != file_orders(6)


# ------------------------------------------------------------------------------------------------ 2. exact resume
def build_stream(paths, workers=0):
    records = TextRecords(paths, passes=None, seed=7)
    return host_batches(records, encode, length=LENGTH, rows=ROWS, pad=PAD, shuffle_buffer=100, seed=3,
                        workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_json_round_tripped_state_resumes_exactly_across_passes(tmp_path, workers):
    """Stopped after k batches, its state written as JSON and read back into a new iterator: the same batches as
    the uninterrupted iterator's next ones, from a stop in the first pass (the compared batches run into the
    second) and from one in the second pass (files in another order; the compared batches run into the third).
    With workers, the second stop only (each iterator starts two processes)."""
    # A pass well longer than an encode batch (TEXTS_PER_ENCODE records), which the state can lag behind by.
    paths = corpus(tmp_path, files=2, records=500)
    texts = [line for path in paths for line in open(path).read().splitlines()]
    batches_per_pass = sum(map(len, encode(texts)["input_ids"])) / (ROWS * LENGTH)  # about 90
    following = int(0.5 * batches_per_pass)  # batches compared after each stop
    stops = {int(0.7 * batches_per_pass): 1, int(1.8 * batches_per_pass): 2}  # stop: the pass it runs into
    if workers:
        del stops[int(0.7 * batches_per_pass)]
    whole, reference, states = build_stream(paths, workers), [], {}
    try:
        for step in range(max(stops) + following):
            if step in stops:
                states[step] = round_trip(whole.get_state())
            reference.append(next(whole)["input_ids"])
    finally:
        whole.close()
    for stop, into in stops.items():  # a pass boundary between the stop and the end of the compared batches
        assert {p["pass"] for p in reader_positions(states[stop])} == {into - 1}
        assert stop + following > into * batches_per_pass
    assert all(b.shape == (ROWS, LENGTH) for b in reference)
    assert len({b.tobytes() for b in reference}) == len(reference)  # an off-by-one resume could not pass

    for stop, state in states.items():
        resumed = build_stream(paths, workers)
        try:
            resumed.set_state(state)
            batches = [next(resumed)["input_ids"] for _ in range(following)]
        finally:
            resumed.close()
        np.testing.assert_array_equal(np.stack(batches), np.stack(reference[stop:stop + following]),
                                      err_msg=f"resumed after {stop} batches ({workers} workers)")


def test_a_state_at_the_end_of_a_pass_resumes_into_the_next_one(tmp_path):
    """Taken after the last record of a pass (the reader still at the end of its file), a state says the pass had
    records: the resumed reader goes on to the next pass instead of taking the share for empty."""
    (path,) = corpus(tmp_path, files=1, records=3)
    reader = iter(TextRecords([path], passes=None))
    assert [next(reader) for _ in range(3)] == ["0.0", "0.1", "0.2"]
    resumed = iter(TextRecords([path], passes=None))
    resumed.set_state(round_trip(reader.get_state()))
    with deadline(20):
        assert list(itertools.islice(resumed, 4)) == ["0.0", "0.1", "0.2", "0.0"]


# ------------------------------------------------------------------------------ 3. resume does not read again
def test_resume_deep_in_a_text_file_reads_from_its_byte_offset_not_the_records_before(tmp_path):
    """Resumed far into a large text file, the reader reopens it at its byte offset: until the first batch it reads
    the shuffle window the position is in and the encode batch in hand (a prefetch of the next batches may add the
    next encode batch; reading is by whole windows), not the records before the position; the lines before the
    window are not even decoded (they are overwritten with bytes that are not UTF-8, which a reader starting from
    the top stops on)."""
    path = tmp_path / "big.txt"
    lines = [f"record {r:05d}\n" for r in range(20000)]
    path.write_text("".join(lines))
    window = 200

    def build():
        records = TextRecords([str(path)], passes=None, seed=0)
        return host_batches(records, encode, length=32, rows=8, pad=PAD, shuffle_buffer=window, seed=1)

    stream = build()
    try:
        for _ in range(700):  # about 20 records a batch: some 14,000 records in
            next(stream)
        state = round_trip(stream.get_state())
        expected = next(stream)["input_ids"]
    finally:
        stream.close()
    start = min(p["record"] for p in reader_positions(state))  # where the reader will reopen the file
    bound = 2 * (window + TEXTS_PER_ENCODE)
    assert start > 10 * bound, state

    with open(path, "r+b") as f:  # the lines before it, the same lengths, now not UTF-8
        f.write(b"".join(b"\xff" * (len(line) - 1) + b"\n" for line in lines[:start]))
    with pytest.raises(ValueError, match="line 1 is not UTF-8"):
        read(TextRecords([str(path)]))

    resumed = build()
    try:
        reader = reader_of(resumed)
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["input_ids"], expected)
    finally:
        resumed.close()  # (its prefetch thread stopped: nothing more is read)
    assert 0 < reader.records_read <= bound, reader.records_read
    assert reader.files_opened == 1


# --------------------------------------------------------------------------------------------------- 4. formats
TEXTS = ["alpha beta", "gamma", 'delta, "quoted"', "épsilon ζ", "", "eta theta iota", "kappa"]


@pytest.fixture
def formats(tmp_path):
    """The same texts in each format: {name: path}."""
    paths = {name: tmp_path / name for name in ("plain.txt", "lines.txt.gz", "lines.txt.bz2", "text.jsonl",
                                                 "text.jsonl.xz", "first.json", "table.csv", "table.parquet")}
    paths["plain.txt"].write_text("".join(t + "\n" for t in TEXTS), encoding="utf-8")
    for name, module in (("lines.txt.gz", gzip), ("lines.txt.bz2", bz2)):
        paths[name].write_bytes(module.compress(paths["plain.txt"].read_bytes()))
    # "text" though another string field comes first; a blank line is no record.
    rows = [json.dumps({"id": i, "title": f"title {i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)]
    paths["text.jsonl"].write_text("".join(rows[:2] + ["\n"] + rows[2:]), encoding="utf-8")
    paths["text.jsonl.xz"].write_bytes(lzma.compress(paths["text.jsonl"].read_bytes()))
    # No "text": the first string field.
    paths["first.json"].write_text("".join(json.dumps({"id": i, "body": t, "note": "n"}, ensure_ascii=False) + "\n"
                                           for i, t in enumerate(TEXTS)), encoding="utf-8")
    with open(paths["table.csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(enumerate(TEXTS))
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), paths["table.parquet"],
                   row_group_size=3)  # 3 row groups: a resume skips whole ones
    return {name: str(path) for name, path in paths.items()}


def test_every_format_gives_the_same_texts_in_order(formats):
    for name, path in formats.items():
        assert read(TextRecords([path]))[0] == TEXTS, name
    assert read(TextRecords([formats["text.jsonl"]], column="title"))[0] == [f"title {i}" for i in range(7)]
    assert read(TextRecords([formats["first.json"]], column="note"))[0] == ["n"] * 7
    # All in one stream, in the order given.
    assert read(TextRecords([formats["plain.txt"], formats["table.parquet"]]))[0] == TEXTS * 2


@pytest.mark.parametrize("name", ["lines.txt.gz", "table.parquet", "plain.txt", "table.csv", "text.jsonl",
                                  "text.jsonl.xz"])
def test_a_state_inside_a_file_resumes_at_the_next_record(formats, name):
    for taken in range(len(TEXTS) + 1):
        reader = iter(TextRecords([formats[name]]))
        assert [next(reader) for _ in range(taken)] == TEXTS[:taken]
        state = round_trip(reader.get_state())
        resumed = iter(TextRecords([formats[name]]))
        resumed.set_state(state)
        assert list(resumed) == TEXTS[taken:], (name, taken)
        assert resumed.records_read == len(TEXTS) - taken


def zstd_frame(data: bytes) -> bytes:
    """A Zstandard frame holding `data` (under 256 bytes) as one stored block: what `zstd` writes, without zstandard."""
    return b"\x28\xb5\x2f\xfd\x20" + bytes([len(data)]) + (1 | len(data) << 3).to_bytes(3, "little") + data


@pytest.mark.parametrize("name", ["lines.txt.zst", "lines.txt.zstd"])
def test_a_zstandard_file_is_decompressed_or_refused_in_one_line(tmp_path, name):
    """Either extension: decompressed where zstandard is installed, else refused naming the file and the package
    (never read as it is, which a reader would take for text that is not UTF-8)."""
    path = tmp_path / name
    path.write_bytes(zstd_frame("".join(t + "\n" for t in TEXTS).encode()))
    if importlib.util.find_spec("zstandard"):
        assert read(TextRecords([str(path)]))[0] == TEXTS
    else:
        with pytest.raises(ValueError) as raised:
            read(TextRecords([str(path)]))
        suffix = name.rsplit(".", 1)[-1]
        assert str(raised.value) == f"{path}: cannot decompress .{suffix} files here (pip install zstandard)."


# ---------------------------------------------------------------------------------------------------- 5. errors
@pytest.mark.parametrize("name, content, column, message", [
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', None, "line 2 is not valid JSON"),
    ("list.jsonl", b'{"text": "a"}\n\n[1, 2]\n', None, "line 3 is not a JSON object"),
    ("numbers.jsonl", b'{"id": 1, "n": 2}\n', None,
     "record 1 has no text field (expected 'text' or any string field, found id, n)"),
    ("other.jsonl", b'{"text": "a"}\n{"body": "b"}\n', None, "record 2 has no 'text' field"),
    ("table.csv", b"id,body\n1,one\n", "text", "record 2 has no 'text' field"),
    ("latin1.txt", "ok\nd\xe9j\xe0 vu\n".encode("latin-1"), None, "line 2 is not UTF-8 text"),
    ("latin1.jsonl", '{"text": "ok"}\n{"text": "d\xe9j\xe0 vu"}\n'.encode("latin-1"), None,
     "line 2 is not UTF-8 text"),
    ("latin1.txt.gz", gzip.compress("ok\nok\nd\xe9j\xe0 vu\n".encode("latin-1")), None, "line 3 is not UTF-8 text"),
])
def test_a_bad_record_stops_with_one_line_naming_the_file_and_the_line(tmp_path, name, content, column, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        read(TextRecords([str(path)], column=column))
    assert str(raised.value).startswith(f"{path}: {message}"), str(raised.value)
    assert "\n" not in str(raised.value)


def test_file_format_reads_the_name_and_refuses_what_a_stream_cannot_read():
    assert file_format("corpus.txt") == ("text", False)
    assert file_format("data/part-0001.JSONL.gz") == ("json", True)
    assert file_format("c4.json.zst") == ("json", True)
    assert file_format("gs://bucket/v1.2/table.parquet") == ("parquet", False)
    assert file_format("rows.csv.bz2") == ("csv", True)
    for name in ("notes.docx", "table.parquet.gz", "archive.gz", "README"):
        with pytest.raises(ValueError, match=rf"^{re.escape(name)}: a stream reads csv, json, jsonl, parquet, text, "
                                             r"txt files \(the text ones may be compressed: gz, bz2, xz, zst, zstd\)"):
            file_format(name)


def test_resolve_files_takes_a_file_a_folder_or_a_glob_pattern_sorted(tmp_path):
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "c.txt.gz", "nested/d.jsonl"):
        (data / name).write_text("")
    assert resolve_files("train_file", str(data / "*.jsonl")) == [str(data / "a.jsonl"), str(data / "b.jsonl")]
    assert resolve_files("train_file", str(data / "[ac]*")) == [str(data / "a.jsonl"), str(data / "c.txt.gz")]
    # A folder: its files (not its folders), sorted.
    assert resolve_files("train_file", str(data)) == [str(data / n) for n in ("a.jsonl", "b.jsonl", "c.txt.gz")]
    assert resolve_files("train_file", str(data / "b.jsonl")) == [str(data / "b.jsonl")]

    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=f"^--validation_file={re.escape(str(missing))}: no such file.$"):
        resolve_files("validation_file", str(missing))
    with pytest.raises(FileNotFoundError, match="^--train_file=.*: no such file"):
        resolve_files("train_file", str(data / "*.parquet"))
    (data / "notes.md").write_text("")
    with pytest.raises(ValueError, match=f"^{re.escape(str(data / 'notes.md'))}: a stream reads"):
        resolve_files("train_file", str(data))


# ---------------------------------------------------------------------------------------------------- 6. blocks
def lists_of_texts(*lists):
    return grain.MapDataset.source(list(lists)).to_iter_dataset()


def test_blocks_without_concatenating_are_one_a_non_empty_text():
    blocks = list(Blocks(lists_of_texts(["one", "", "three"], ["fifteen", "x"]), first_four, length=4,
                         concatenate=False))
    assert [b["input_ids"].tolist() for b in blocks] == [[ord(c) for c in t] for t in ("one", "thre", "fift", "x")]
    assert all(b["input_ids"].dtype == np.int32 for b in blocks)


def test_concatenated_blocks_are_the_joined_tokens_cut_exactly_the_tail_carried_on():
    lists = [["ab", "cde"], ["f"], ["ghijklm", "", "no"], ["pqrstuvw"]]
    joined = [token for texts in lists for ids in encode(texts)["input_ids"] for token in ids]  # 31 tokens
    dataset = Blocks(lists_of_texts(*lists), encode, length=5, concatenate=True)
    blocks = [b["input_ids"] for b in dataset]
    assert [len(b) for b in blocks] == [5] * (len(joined) // 5)  # exactly 5 each; the last 1 token waits, unused
    # The first list alone has 7 tokens: one block, its 2 left over start the next (with the following texts).
    assert np.concatenate(blocks).tolist() == joined[:len(blocks) * 5]

    for taken in range(len(blocks) + 1):  # the carried tokens are part of the state
        iterator = iter(dataset)
        for _ in range(taken):
            next(iterator)
        resumed = iter(dataset)
        resumed.set_state(round_trip(iterator.get_state()))
        assert [b["input_ids"].tolist() for b in resumed] == [b.tolist() for b in blocks[taken:]], taken


def test_host_batches_pad_short_blocks_and_drop_the_last_incomplete_batch(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("ab\n\nlonger\nc\nxyz\n")  # 4 non-empty texts (blocks), 2 a batch: 2 batches
    stream = host_batches(TextRecords([str(path)]), first_four, length=4, rows=2, pad={"input_ids": -1},
                          concatenate=False)
    try:
        batches = [b["input_ids"].tolist() for b in stream]
    finally:
        stream.close()
    ids = lambda t: [ord(c) for c in t]  # noqa: E731
    assert batches == [[ids("ab") + [-1, -1], ids("long")], [ids("c") + [-1, -1, -1], ids("xyz") + [-1]]]

    path.write_text("ab\nlonger\nc\n")  # 3 texts: the third block is no full batch
    stream = host_batches(TextRecords([str(path)]), first_four, length=4, rows=2, pad={"input_ids": -1},
                          concatenate=False)
    try:
        assert len(list(stream)) == 1
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------ 7. an empty share
def test_a_share_without_records_ends_instead_of_looping_over_passes(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("first\nsecond\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with deadline(20):
        assert read(TextRecords([str(path)], passes=None).shard(3, 4))[0] == []  # 4 shares of 2 records
        assert read(TextRecords([str(empty)], passes=None))[0] == []
        # A share with a record reads it again pass after pass.
        assert list(itertools.islice(iter(TextRecords([str(path)], passes=None).shard(1, 4)), 5)) == ["second"] * 5
        stream = host_batches(TextRecords([str(path)], passes=None, seed=0).shard(2, 4), encode, length=LENGTH,
                              rows=ROWS, pad=PAD, shuffle_buffer=8)
        try:
            with pytest.raises(StopIteration):
                next(stream)
        finally:
            stream.close()


def test_a_state_saved_with_another_number_of_workers_is_refused_in_one_line(tmp_path):
    paths = corpus(tmp_path, 1, 50)
    state = round_trip(build_stream(paths).get_state())
    other = build_stream(paths, workers=1)
    try:
        with pytest.raises(ValueError, match=r"^The input position was saved with --preprocessing_num_workers=0 and "
                                             r"this run has 1: a stream resumes with as many workers as it saved "
                                             r"with\.$"):
            other.set_state(state)
    finally:
        other.close()


def test_a_state_of_another_share_or_file_list_is_refused_in_one_line(tmp_path):
    """A run that changed --tensor_parallel across hosts (another number of shares) or whose glob matches other
    files would read a saved position into another list of files: refused."""
    paths = corpus(tmp_path, 2, 50)

    def stream(share):
        return host_batches(TextRecords(paths, passes=None), encode, length=LENGTH, rows=ROWS, pad=PAD,
                            identity={"share": share, "files": len(paths)})

    saved, other = stream([0, 2]), stream([0, 1])
    state = round_trip(saved.get_state())
    try:
        with pytest.raises(ValueError, match=r"^The input position was saved for \{'workers': 0, 'share': \[0, 2\], "
                                             r"'files': 2\} and this run reads \{'workers': 0, 'share': \[0, 1\], "
                                             r"'files': 2\} .*same hosts, --tensor_parallel and files\.$"):
            other.set_state(state)
        same = stream([0, 2])
        same.set_state(state)  # the same pipeline: restored
        same.close()
    finally:
        saved.close()
        other.close()


def test_blank_lines_are_no_records_when_each_line_is_an_example(tmp_path):
    """(--line_by_line) A share of blank lines ends, rather than passing over them for ever."""
    (tmp_path / "blank.txt").write_text("\n  \nword\n\n")
    assert read(TextRecords([str(tmp_path / "blank.txt")], skip_blank=True))[0] == ["word"]
    (tmp_path / "blanks.txt").write_text("\n \n\n")
    with deadline(10):
        assert read(TextRecords([str(tmp_path / "blanks.txt")], passes=None, skip_blank=True))[0] == []

"""Streaming input (`--streaming`): each host reads, tokenizes and packs only its share of the text, in worker
processes, and the position of its input is saved with every checkpoint.

The pipeline is a chain of Grain datasets (as MaxText's):

    TextRecords (this host's files, or every count-th record)  ->  window shuffle  ->  lists of texts
      ->  Blocks (the script's tokenizer, then packed into blocks)  ->  host batches  ->  worker processes

Every stage is a Grain iterator with a small JSON state, so the state of the whole chain (`get_state`) says where
this host's input stands; `checkpoint.Checkpoints` saves it, one file per host, and a resumed run continues from that
record without reading what was trained on (a text file is reopened at its byte offset).

A host's share: when there are at least as many files as shares, whole files (every count-th); else every
count-th record of every file. Grain's worker processes split a host's share again the same way (`set_slice`).
The shares are the mesh's distinct row sets (`parallel.host_share`): hosts that hold the same rows (replicas along
`tensor`) read the same share.
"""

import copy
import csv
import functools
import io
import json
import logging
import sys
from collections.abc import Callable, Sequence

import fsspec
import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset, WindowShuffleIterDataset

from flaxtrain import parallel, storage

logger = logging.getLogger(__name__)

LINES = {"txt": "text", "text": "text", "json": "json", "jsonl": "json"}
FORMATS = {**LINES, "csv": "csv", "parquet": "parquet"}
COMPRESSIONS = ("gz", "bz2", "xz", "zst", "zstd")
TEXTS_PER_ENCODE = 256  # records tokenized in one call of the (batched, fast) tokenizer
EPOCH_ORDER = 6  # RNG stream tag of a share's file order in each pass (see data.RNG_STREAMS)


def file_format(path: str) -> tuple[str, bool]:
    """(format, compressed) of a data file from its name: corpus.txt, part-0001.jsonl.gz, c4.json.zst, x.parquet."""
    parts = path.rsplit("/", 1)[-1].lower().split(".")
    compressed = len(parts) > 2 and parts[-1] in COMPRESSIONS
    extension = parts[-2] if compressed else parts[-1]
    if extension not in FORMATS or (compressed and extension == "parquet"):
        raise ValueError(f"{path}: a stream reads {', '.join(sorted(FORMATS))} files (the text ones may be "
                         f"compressed: {', '.join(COMPRESSIONS)}).")
    return FORMATS[extension], compressed


def resolve_files(flag: str, pattern: str) -> list[str]:
    """The files of --train_file/--validation_file when streaming: a file, a folder (its files), or a glob pattern
    (`data/*.jsonl.gz`, `gs://bucket/c4/train-*.json`), sorted, so every host lists them in one order."""
    if storage.isdir(pattern):
        pattern = storage.join(pattern, "[!._]*")  # not hidden files, nor markers such as _SUCCESS
    if any(c in pattern for c in "*?["):
        fs, _, _ = fsspec.get_fs_token_paths(pattern)
        protocol = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        files = sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in fs.glob(pattern)
                       if fs.isfile(p))
    else:
        files = [pattern] if storage.isfile(pattern) else []
    if not files:
        raise FileNotFoundError(f"--{flag}={pattern}: no such file.")
    for path in files:
        file_format(path)
    return files


def hub_data_files(name: str, config: str | None, split: str, token=None, cache_dir=None) -> list[str]:
    """The data files (hf://datasets/... URLs) of a Hub dataset's split, for datasets that are files (json, csv,
    parquet, text: C4, OSCAR's parquet, FineWeb...); resolved once, without downloading any."""
    import datasets

    builder = datasets.load_dataset_builder(name, config, token=token, cache_dir=cache_dir)
    files = (builder.config.data_files or {}).get(split)
    if not files:
        raise ValueError(f"--dataset_name={name}: no data files for the {split!r} split to stream (a dataset made by "
                         "a loading script cannot be streamed here; give --train_file/--validation_file).")
    for path in files:
        file_format(path)
    return sorted(files)


def files_by_split(*wanted: dict, dataset_name: str | None, dataset_config: str | None = None, token=None,
                   cache_dir=None) -> dict[str, list[str]]:
    """{split: its files} for each split of the `wanted` dicts ({split: --{split}_file's pattern, or None}): see
    split_files."""
    return {split: split_files(split, pattern, dataset_name, dataset_config, token, cache_dir)
            for splits in wanted for split, pattern in splits.items()}


def split_files(split: str, file_pattern: str | None, dataset_name: str | None, dataset_config: str | None = None,
                token=None, cache_dir=None) -> list[str]:
    """The files to stream for `split` ("train" or "validation"): --{split}_file's (`resolve_files`), else a Hub
    dataset's data files (`hub_data_files`)."""
    if file_pattern:
        return resolve_files(f"{split}_file", file_pattern)
    if dataset_name:
        return hub_data_files(dataset_name, dataset_config, split, token=token, cache_dir=cache_dir)
    raise ValueError(f"--streaming needs --{split}_file or --dataset_name.")


class Share:
    """Which records of a list of files a reader takes: files[file_index::file_count], then of each file the
    records r with r % record_stride == record_offset."""

    def __init__(self, files: Sequence[str]):
        self.files, self.record_stride, self.record_offset = list(files), 1, 0

    def split(self, index: int, count: int) -> "Share":
        """The index-th of `count` shares of this one: by file while there are files enough, else by record."""
        part = copy.copy(self)
        if count <= len(self.files):
            part.files = self.files[index::count]
        else:
            part.record_stride = self.record_stride * count
            part.record_offset = self.record_offset + self.record_stride * index
        return part


class TextRecords(grain.IterDataset):
    """The texts of a share of `files` (local, gs:// or hf:// paths), in passes over them.

    `column`: the field holding the text in json/csv/parquet files (None: "text", else the first string field).
    `passes`: how many passes (None: without end). From the second pass on (and in the first, with `seed` set), the
    share's files come in an order drawn from (seed, pass). Text files keep their line breaks with `keep_linebreaks`.
    `skip_blank`: blank texts are no records (one example per line: a share of blank lines ends rather than loops).
    """

    def __init__(self, files: Sequence[str], *, column: str | None = None, passes: int | None = 1,
                 seed: int | None = None, keep_linebreaks: bool = False, skip_blank: bool = False):
        super().__init__()
        self.share, self.column, self.passes, self.seed = Share(files), column, passes, seed
        self.keep_linebreaks, self.skip_blank = keep_linebreaks, skip_blank

    def shard(self, index: int, count: int) -> "TextRecords":
        """This dataset reading only the index-th of `count` shares (one per host)."""
        part = copy.copy(self)
        part.share = self.share.split(index, count)
        return part

    def set_slice(self, sl: slice, sequential_slice: bool = False):
        """Grain's worker processes each read their slice of the share (slice(worker, None, workers))."""
        del sequential_slice
        self.share = self.share.split(sl.start or 0, sl.step or 1)

    def __iter__(self):
        return _TextRecordsIterator(self)

    def __str__(self):
        return f"TextRecords({len(self.share.files)} files)"


class _TextRecordsIterator(grain.DatasetIterator):
    """State: the pass, the file (its place in the pass's order), the records read in it, and the byte offset after
    them (where a line-based file that is not compressed is reopened)."""

    def __init__(self, source: TextRecords):
        super().__init__()
        self.source = source
        self.records_read = self.files_opened = 0  # (what this reader did: for the tests and the logs)
        self._position = {"pass": 0, "file": 0, "record": 0, "offset": 0}
        self._found_in_pass = 0
        self._reader = self._files = self._decode = None

    def _order(self, pass_index: int) -> list[str]:
        """The share's files in the order of this pass (drawn once a pass: this is asked for every record)."""
        if self._files is None or self._files[0] != pass_index:
            files = self.source.share.files
            if self.source.seed is not None or pass_index > 0:
                order = np.random.default_rng([self.source.seed or 0, EPOCH_ORDER, pass_index]).permutation(len(files))
                files = [files[i] for i in order]
            self._files = (pass_index, files)
        return self._files[1]

    def __next__(self) -> str:
        share, position = self.source.share, self._position
        while True:
            if self.source.passes is not None and position["pass"] >= self.source.passes:
                raise StopIteration
            files = self._order(position["pass"])
            if position["file"] >= len(files):  # the end of a pass
                if self._found_in_pass == 0:
                    raise StopIteration  # nothing in this share: an endless loop otherwise
                position.update({"pass": position["pass"] + 1, "file": 0, "record": 0, "offset": 0})
                self._found_in_pass = 0
                continue
            if self._reader is None:
                self._reader = self._open(files[position["file"]], position)
            for raw, offset in self._reader:
                position["record"] += 1
                position["offset"] = offset
                # Only this share's records are decoded and parsed: the others are passed over as bytes.
                if (position["record"] - 1) % share.record_stride == share.record_offset:
                    text = self._decode(raw, position["record"])
                    if text is not None and not (self.source.skip_blank and not text.strip()):
                        self.records_read += 1
                        self._found_in_pass += 1
                        return text
            self._reader = None
            position.update({"file": position["file"] + 1, "record": 0, "offset": 0})

    def get_state(self) -> dict:
        return {**self._position, "found_in_pass": self._found_in_pass}

    def set_state(self, state: dict):
        self._position = {key: state[key] for key in ("pass", "file", "record", "offset")}
        self._found_in_pass = state["found_in_pass"]
        self._reader = None

    # ------------------------------------------------------------------------------------------ readers
    def _open(self, path: str, position: dict):
        """A generator of (raw record, byte offset after it) from record position["record"] on; sets _decode."""
        self.files_opened += 1
        kind, compressed = file_format(path)
        self._decode = functools.partial(getattr(self, f"_{kind}_text"), path)
        if position["record"]:  # a resumed run: said, so that a reader of the log sees nothing is read twice
            logger.info("Streaming %s from record %d (byte %d)", path, position["record"], position["offset"])
        if kind == "parquet":
            return self._parquet(path, position["record"])
        raw = fsspec.open(path, "rb", compression=_compression(path) if compressed else None).open()
        if not isinstance(raw, io.IOBase):  # zstandard's reader reads, but has no lines
            raw = io.BufferedReader(raw)
        if kind == "csv":
            return self._csv(raw, position["record"])
        if not compressed and position["offset"]:
            raw.seek(position["offset"])
            return self._lines(raw, position["offset"])
        return self._skip(self._lines(raw, 0), position["record"])

    @staticmethod
    def _skip(records, count):
        for _ in range(count):
            next(records, None)
        return records

    @staticmethod
    def _lines(raw, offset):
        with raw:
            for line in raw:
                offset += len(line)
                yield line, offset

    @staticmethod
    def _csv(raw, skip):
        with raw:
            rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            yield from ((row, 0) for number, row in enumerate(rows) if number >= skip)

    @staticmethod
    def _parquet(path, skip):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb").open() as f:
            table = pq.ParquetFile(f)
            for group in range(table.num_row_groups):
                rows = table.metadata.row_group(group).num_rows
                if skip >= rows:
                    skip -= rows
                    continue
                yield from ((row, 0) for row in table.read_row_group(group).to_pylist()[skip:])
                skip = 0

    # Each kind's record -> its text (None: no record, a blank line of a JSON Lines file); `number` counts records.
    def _text_text(self, path: str, line: bytes, number: int) -> str:
        text = _utf8(path, line, number)
        return text if self.source.keep_linebreaks else text.rstrip("\r\n")

    def _json_text(self, path: str, line: bytes, number: int):
        text = _utf8(path, line, number)
        return self._field(path, number, _json_row(path, number, text)) if text.strip() else None

    def _csv_text(self, path: str, row: dict, number: int) -> str:
        return self._field(path, number + 1, row)  # (line 1 is the header)

    def _parquet_text(self, path: str, row: dict, number: int) -> str:
        return self._field(path, number, row)

    def _field(self, path: str, number: int, row: dict) -> str:
        column = self.source.column
        if column is None:
            column = "text" if "text" in row else next((k for k, v in row.items() if isinstance(v, str)), None)
            if column is None:
                raise ValueError(f"{path}: record {number} has no text field (expected 'text' or any string "
                                 f"field, found {', '.join(row) or 'none'}).")
            self.source.column = column
        if column not in row:
            raise ValueError(f"{path}: record {number} has no {column!r} field.")
        return row[column] or ""


def _compression(path: str) -> str:
    """fsspec's name of the codec of a compressed file (its last extension; fsspec's "infer" knows no .zstd, and .zst
    only with zstandard installed: a file it does not know is read as it is), refused in one line if not installed."""
    suffix = path.rsplit(".", 1)[-1].lower()
    codec = {"gz": "gzip", "zst": "zstd"}.get(suffix, suffix)
    if codec not in fsspec.available_compressions():
        raise ValueError(f"{path}: cannot decompress .{suffix} files here"
                         + (" (pip install zstandard)." if codec == "zstd" else "."))
    return codec


def _utf8(path: str, line: bytes, number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {number} is not UTF-8 text ({e.reason}).") from None


def _json_row(path: str, number: int, text: str) -> dict:
    try:
        row = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg}); a stream reads JSON Lines, one "
                         "object per line.") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}: line {number} is not a JSON object; a stream reads JSON Lines, one object per "
                         "line.")
    return row


class Blocks(grain.IterDataset):
    """Lists of texts -> token blocks: `encode(texts)` gives {column: [token ids of each text]}; with `concatenate`
    the texts are joined and cut into blocks of exactly `length` tokens (the tail waits for the next texts), else each
    non-empty text is a block of its own (at most `length` tokens: `encode` truncates). Yields {column: int32 [n]}."""

    def __init__(self, parent: grain.IterDataset, encode: Callable, length: int, concatenate: bool = True):
        super().__init__(parent)
        self.encode, self.length, self.concatenate = encode, length, concatenate

    def __iter__(self):
        return _BlocksIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"Blocks(length={self.length})"


class _BlocksIterator(grain.DatasetIterator):
    """State: the parent's state before the texts in hand, the tokens carried into them, and how many of their
    blocks were given out. A restore reads and tokenizes those texts again (at most TEXTS_PER_ENCODE)."""

    def __init__(self, parent, blocks: Blocks):
        super().__init__(parent)
        self.blocks = blocks
        self._before, self._carry_in, self._given = self._parent.get_state(), {}, 0
        self._carry, self._queue, self._skip = {}, [], 0

    def __next__(self) -> dict:
        while not self._queue:
            self._before, self._carry_in, self._given = self._parent.get_state(), self._carry, 0
            self._queue = self._pack(next(self._parent))
            skip, self._skip = min(self._skip, len(self._queue)), 0
            self._queue, self._given = self._queue[skip:], skip
        self._given += 1
        return self._queue.pop(0)

    def _pack(self, texts) -> list[dict]:
        encoded = self.blocks.encode(list(texts))
        length = self.blocks.length
        if not self.blocks.concatenate:
            count = len(next(iter(encoded.values())))
            return [{k: np.asarray(v[i], np.int32) for k, v in encoded.items()} for i in range(count)
                    if len(next(iter(encoded.values()))[i])]
        joined = {k: np.concatenate([np.asarray(self._carry.get(k, []), np.int32),
                                     *(np.asarray(s, np.int32) for s in v)]) for k, v in encoded.items()}
        total = len(next(iter(joined.values())))
        usable = total // length * length
        self._carry = {k: v[usable:].tolist() for k, v in joined.items()}
        return [{k: v[i:i + length] for k, v in joined.items()} for i in range(0, usable, length)]

    def get_state(self) -> dict:
        return {"parent": self._before, "carry": self._carry_in, "given": self._given + self._skip}

    def set_state(self, state: dict):
        self._parent.set_state(state["parent"])
        self._carry, self._skip, self._queue = state["carry"], state["given"], []
        self._before, self._carry_in, self._given = state["parent"], state["carry"], 0


def padded_batch(pad: dict, length: int):
    """A Grain batch_fn: blocks of up to `length` tokens -> {column: [n, length]}, padded with pad[column]."""
    def stack(blocks):
        out = {k: np.full((len(blocks), length), value, np.int32) for k, value in pad.items()}
        for i, block in enumerate(blocks):
            for k, values in block.items():
                out[k][i, :len(values)] = values
        return out
    return stack


def host_blocks(records: TextRecords, encode: Callable, *, length: int, pad: dict, concatenate: bool = True,
                limit: int | None = None) -> dict:
    """Every block of `records` (at most `limit`), as {column: int32 [n, length]}: a host's evaluation share."""
    blocks = iter(Blocks(records.batch(TEXTS_PER_ENCODE, batch_fn=list), encode, length, concatenate))
    return padded_batch(pad, length)([block for block, _ in zip(blocks, range(limit or sys.maxsize))])


def host_batches(records: TextRecords, encode: Callable, *, length: int, rows: int, pad: dict,
                 concatenate: bool = True, shuffle_buffer: int = 0, seed: int = 0, workers: int = 0,
                 identity: dict | None = None):
    """This host's batches of a stream: {column: int32 [rows, length]} (blocks shorter than `length` padded with
    pad[column]), as a checkpointable Grain iterator (get_state / set_state). The records are shuffled in windows
    of `shuffle_buffer` (0 or 1: in file order), tokenized TEXTS_PER_ENCODE at a time, packed (see Blocks) and
    batched in `workers` processes (0: in a thread of this one), each working on its slice of the records; the
    batches come back in a fixed order, so a run gives the same batches whatever the machine's speed.

    The iterator ends when the records do (the last incomplete batch is dropped). Its state carries `identity`
    (JSON values: what else must match for it to be restored) and the number of workers."""
    dataset = records
    if shuffle_buffer > 1:
        dataset = WindowShuffleIterDataset(dataset, window_size=shuffle_buffer, seed=seed)
    dataset = Blocks(dataset.batch(TEXTS_PER_ENCODE, batch_fn=list), encode, length, concatenate)
    dataset = dataset.batch(rows, drop_remainder=True, batch_fn=padded_batch(pad, length))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's worker options are absl flags; we take none from the command line
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    else:
        dataset = ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=2)
    return _Labelled(iter(dataset), {"workers": workers, **(identity or {})})


class _Labelled(grain.DatasetIterator):
    """The pipeline's iterator, its state labelled with what it is the state of (the number of worker processes,
    this host's share and the files): restoring a state into another pipeline is refused in one line."""

    def __init__(self, parent, label: dict):
        super().__init__(parent)
        self.label = label

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {**self.label, "pipeline": self._parent.get_state()}

    def set_state(self, state: dict):
        if state["workers"] != self.label["workers"]:
            raise ValueError(f"The input position was saved with --preprocessing_num_workers={state['workers']} and "
                             f"this run has {self.label['workers']}: a stream resumes with as many workers as it "
                             "saved with.")
        saved = {key: state.get(key) for key in self.label}
        if saved != self.label:
            raise ValueError(f"The input position was saved for {saved} and this run reads {self.label} (share: "
                             "this host's of how many; files: how many): a stream resumes with the same hosts, "
                             "--tensor_parallel and files.")
        self._parent.set_state(state["pipeline"])

    def close(self):
        self._parent.close()


# ------------------------------------------------------------------------------------- what the scripts call
def training_batches(files: Sequence[str], mesh, global_rows: int, encode: Callable, *, length: int, pad: dict,
                     concatenate: bool = True, shuffle_buffer: int = 0, seed: int = 0, workers: int = 0,
                     keep_linebreaks: bool = False):
    """This host's rows of every global batch of `global_rows` from a stream of `files`, passing over this host's
    share again and again (in another file order each pass): `host_batches`' checkpointable iterator."""
    share = parallel.host_share(mesh, global_rows)
    records = TextRecords(files, passes=None, seed=seed, keep_linebreaks=keep_linebreaks, skip_blank=not concatenate)
    return host_batches(records.shard(*share), encode, length=length, rows=len(parallel.host_rows(mesh, global_rows)),
                        pad=pad, concatenate=concatenate, shuffle_buffer=shuffle_buffer, seed=seed, workers=workers,
                        identity={"share": list(share), "files": len(files)})


def evaluation_blocks(files: Sequence[str], mesh, global_rows: int, encode: Callable, *, length: int, pad: dict,
                      concatenate: bool = True, limit: int | None = None,
                      keep_linebreaks: bool = False) -> tuple[dict, int, int]:
    """This host's share of the evaluation blocks of `files` (at most its part of `limit`), for
    loop.evaluate(per_host=True): (blocks {column: [max(n, 1), length]}, n, the blocks of every share). A host with
    none gets one padding row to make its batches of (at weight zero). Raises on every host if no host has any."""
    index, count = parallel.host_share(mesh, global_rows)
    records = TextRecords(files, keep_linebreaks=keep_linebreaks, skip_blank=not concatenate).shard(index, count)
    blocks = host_blocks(records, encode, length=length, pad=pad, concatenate=concatenate,
                         limit=None if limit is None else -(-limit // count))
    mine = len(next(iter(blocks.values())))
    by_share = dict(parallel.host_values([index, mine]).tolist())  # (replicas along `tensor` share a share)
    if sum(by_share.values()) == 0:
        raise ValueError(f"The validation data gives no example of {length} tokens: the text is too short.")
    if mine == 0:
        blocks = padded_batch(pad, length)([{}])
    return blocks, mine, sum(by_share.values())

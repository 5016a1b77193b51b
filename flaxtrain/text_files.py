"""Which files a stream reads, and the text records of a host's share of them (flaxtrain/streaming.py builds the
pipeline on top).

A share: when there are at least as many files as shares, whole files (every count-th); else every count-th record
of every file. Grain's worker processes split a host's share again the same way (`TextRecords.set_slice`). Only a
share's own records are decoded and parsed; a reader's state (pass, file, record, byte offset) is a small JSON, and
an uncompressed line-based file is reopened at its byte offset.
"""

import copy
import csv
import functools
import io
import json
import logging
from collections.abc import Sequence

import fsspec
import grain
import numpy as np

from flaxtrain import storage

logger = logging.getLogger(__name__)

LINES = {"txt": "text", "text": "text", "json": "json", "jsonl": "json"}
FORMATS = {**LINES, "csv": "csv", "parquet": "parquet"}
COMPRESSIONS = ("gz", "bz2", "xz", "zst", "zstd")
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
            fine_tuning = "messages" in row or {"prompt", "completion"} <= row.keys()
            if fine_tuning and "text" not in row:  # (its first string field is only the prompt)
                raise ValueError(f"{path}: record {number} is fine-tuning data ({', '.join(row)}), which a stream "
                                 "does not read: drop --streaming.")
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

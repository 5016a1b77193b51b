"""Loading datasets (Hub name or local txt/csv/json files) and planning the batches each host feeds.

Batches are planned as index arrays over the whole global batch, identically on every host; each host then
gathers only its own rows (`parallel.host_rows`). Training order is a permutation seeded by (seed, epoch), so a
resumed run sees the same batches; evaluation covers every example once, the last partial batch padded with rows
of weight zero so that every evaluation batch has one compiled shape.
"""

import codecs
import json
import logging
from typing import Optional

import datasets
import numpy as np

from flaxtrain import storage

logger = logging.getLogger(__name__)

# Every random stream is keyed [seed, tag, ...] with its own tag and key length, so that no two coincide (numpy
# pads a shorter key with zeros: [s, 1] would be the same stream as [s, 1, 0]). The masks are keyed per example
# (flaxtrain.example_rng.keys of these parts, the index being the example's in its split), so that a host draws
# for its own rows only and an example's mask does not depend on the batch or the hosts that built it.
RNG_STREAMS = {"data order": "[seed, 1, epoch]", "training masks": "[seed, 2, epoch, example index]",
               "evaluation masks": "[seed, 3, example index]",
               # --streaming (flaxtrain/streaming.py): the rows of a host's batch at a step, its evaluation blocks,
               # and the order of its share's files in each pass
               "streamed training masks": "[seed, 4, share, step, row]",
               "streamed evaluation masks": "[seed, 5, share, block index]", "stream file order": "[seed, 6, pass]"}

BUILDERS = {"txt": "text", "text": "text", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
SCAN_CHUNK = 1 << 20  # bytes read at a time when looking for what datasets could not read in a file


def _check_file(flag: str, path: str) -> str:
    if not storage.isfile(path):
        raise FileNotFoundError(f"--{flag}={path}: no such file.")
    try:
        with storage.open_read(path) as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"--{flag}={path}: cannot be read ({e}).") from e
    if storage.size(path) == 0:
        raise ValueError(f"--{flag}={path}: the file is empty.")
    extension = path.rsplit(".", 1)[-1].lower()
    if extension not in BUILDERS:
        raise ValueError(f"--{flag}={path}: unsupported file type; use one of {sorted(BUILDERS)}.")
    return BUILDERS[extension]


def load_raw_datasets(source, need_train: bool, need_eval: bool,
                      need_test: bool = False, eval_splits: tuple[str, ...] = ("validation",), **builder_kwargs):
    """Returns a DatasetDict with "train", "validation" and "test" as needed
    from `source` (a settings.DataSource: a Hub dataset, or local files: --train_file, --validation_file and,
    where the script has it, --test_file).

    Without any of `eval_splits` (a Hub dataset may name them otherwise, e.g. MNLI's "validation_matched"), the
    first `validation_split_percentage` percent of the training data becomes the validation set (and is removed
    from training). `builder_kwargs` go to the text builder only (e.g. keep_linebreaks).
    """
    common = dict(cache_dir=source.cache_dir, token=source.token)
    files, percentage = {}, source.validation_split_percentage
    if source.dataset_name:
        load = dict(path=source.dataset_name, name=source.dataset_config, **common)
    else:
        if source.train_file:
            files["train"] = source.train_file
        if source.validation_file:
            files["validation"] = source.validation_file
        if source.test_file and need_test:
            files["test"] = source.test_file
        if not files:
            raise ValueError("Give --dataset_name or --train_file / --validation_file.")
        builders = {_check_file(f"{split}_file", path) for split, path in files.items()}
        if len(builders) > 1:
            raise ValueError(f"--{'/--'.join(f'{split}_file' for split in files)} must be of one type, got "
                             f"{sorted(builders)}.")
        builder = builders.pop()
        options = builder_kwargs if builder == "text" else {}
        if builder == "json":
            # The json builder hands raw bytes to pyarrow, which keeps invalid UTF-8 without a word (it fails
            # later, inside tokenization); given any encoding name but exactly "utf-8", it decodes strictly first.
            options = dict(encoding="utf_8")
        load = dict(path=builder, data_files=files, **common, **options)

    try:
        raw = datasets.load_dataset(**load)
    except Exception:
        # datasets names neither the file nor the place (it wraps a UnicodeDecodeError or a pyarrow/ujson parse
        # error at a position within one chunk): look for the cause only now, so good files cost nothing extra.
        for split, path in files.items():
            if problem := _file_problem(path):
                raise ValueError(f"--{split}_file={path}: {problem}") from None
        raise
    if need_train and "train" not in raw:
        raise ValueError("Training needs a train split: give --train_file or a dataset that has one.")
    if need_test and not any(split.startswith("test") for split in raw):
        raise ValueError("Prediction (--do_predict) needs --test_file or a dataset with a test split.")
    has_eval = any(split in raw for split in eval_splits)
    if need_eval and not has_eval and not 0 < percentage < 100:
        raise ValueError("Evaluation needs --validation_file or a dataset with a validation split"
                         ", or --validation_split_percentage between 1 and 99.")
    # Held out whether or not this run evaluates, so the training data (and a resumed run's order) do not depend
    # on --do_eval.
    if not has_eval and "train" in raw and 0 < percentage < 100:
        held_out = round(len(raw["train"]) * percentage / 100)
        if held_out == 0 and need_eval:
            raise ValueError(f"The training data has {len(raw['train'])} rows: too few to hold out "
                             f"{percentage}% for evaluation. Give --validation_file.")
        if held_out:
            raw = datasets.DatasetDict({**raw, "validation": raw["train"].select(range(held_out)),
                                        "train": raw["train"].select(range(held_out, len(raw["train"])))})
    for split in raw:
        if split in raw and len(raw[split]) == 0:
            raise ValueError(f"The {split} data has no rows.")
    return raw


def _file_problem(path: str) -> Optional[str]:
    """What datasets cannot read in a local data file (invalid UTF-8; in json, a malformed line; a parquet file
    pyarrow cannot open), or None."""
    if BUILDERS[path.rsplit(".", 1)[-1].lower()] == "parquet":
        import pyarrow.parquet

        try:
            with storage.open_read(path) as f:
                pyarrow.parquet.ParquetFile(f)
        except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds)
            return f"not a parquet file pyarrow can read ({e})."
        return None
    problem = _utf8_problem(path)
    if problem is None and BUILDERS[path.rsplit(".", 1)[-1].lower()] == "json":
        problem = _json_problem(path)
    return problem


def _utf8_problem(path: str) -> Optional[str]:
    """Where the first byte that is not UTF-8 is, streaming the file (any size) through an incremental decoder."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines before this chunk
    with storage.open_read(path) as f:
        while True:
            chunk = f.read(SCAN_CHUNK)
            held = decoder.getstate()[0]  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                start = offset - len(held) + e.start
                line = lines + (held + chunk)[:e.start].count(b"\n") + 1  # (`held` has no newline: bytes >= 0x80)
                return (f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at byte offset {start} (line {line}): "
                        f"{e.reason}. Convert the file to UTF-8.")
            if not chunk:
                return None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def _json_problem(path: str) -> Optional[str]:
    """The first line of a JSON Lines file that is not a JSON object; for a file whose first line is not a
    JSON object on its own (datasets then reads the file as one document: a list of rows, or columns), the
    error in that document."""
    first = True
    with storage.open_read(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                if first:
                    break
                return f"line {number} is not valid JSON: {e.msg} (column {e.colno})."
            if first and isinstance(row, list):
                break
            if not isinstance(row, dict):
                return f"line {number} is not a JSON object: {line.decode().strip()[:40]!r}."
            first = False
        else:
            return None
        try:
            f.seek(0)
            json.load(f)
        except ValueError as e:
            return f"line {e.lineno} is not valid JSON: {e.msg} (column {e.colno})."
    return None


def text_column(dataset) -> str:
    """The column holding the text: `text`, else the first string column; an error naming the columns if none."""
    features = dataset.features
    if "text" in features:
        return "text"
    strings = [name for name, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not strings:
        found = ", ".join(f"{name} ({getattr(f, 'dtype', type(f).__name__)})" for name, f in features.items())
        raise ValueError(f"The data has no text column: expected a column named 'text' or any string column, "
                         f"found {found}.")
    logger.info("No 'text' column: using '%s'.", strings[0])
    return strings[0]


def take(dataset, n):
    """The first n examples (all of them if n is None)."""
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


def train_batches(num_examples: int, global_batch: int, seed: int, epoch: int, start: int = 0):
    """Yields (batch index in epoch, index array) for one epoch, dropping the last incomplete batch.

    The order is a permutation seeded by (seed, epoch); `start` skips batches already trained on (resume).
    """
    order = np.random.default_rng([seed, 1, epoch]).permutation(num_examples)  # 1: see RNG_STREAMS
    for i in range(start, num_examples // global_batch):
        yield i, order[i * global_batch:(i + 1) * global_batch]


def epoch_batches(num_examples: int, global_batch: int, seed: int, start_step: int, total_steps: int):
    """Yields (epoch, batch index in epoch, index array) for the optimizer steps start_step .. total_steps - 1,
    across as many epochs as that takes."""
    steps_per_epoch = num_examples // global_batch
    step = start_step
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        for i, indices in train_batches(num_examples, global_batch, seed, epoch, start=first):
            if step == total_steps:
                return
            yield epoch, i, indices
            step += 1


def eval_batches(num_examples: int, global_batch: int):
    """Yields (index array, number of real rows) covering every example once; the last array is padded by
    repeating index 0, and the caller gives those rows weight zero."""
    for begin in range(0, num_examples, global_batch):
        idx = np.arange(begin, min(begin + global_batch, num_examples))
        yield np.pad(idx, (0, global_batch - len(idx))), len(idx)

"""Streaming input (`--streaming`): each host reads, tokenizes and packs only its share of the text, in worker
processes, and the position of its input is saved with every checkpoint.

The pipeline is a chain of Grain datasets (as MaxText's):

    TextRecords (this host's files, or every count-th record)  ->  window shuffle  ->  lists of texts
      ->  Blocks (the script's tokenizer, then packed into blocks)  ->  host batches  ->  worker processes

Every stage is a Grain iterator with a small JSON state, so the state of the whole chain (`get_state`) says where
this host's input stands; `checkpoint.Checkpoints` saves it, one file per host, and a resumed run continues from that
record without reading what was trained on (a text file is reopened at its byte offset).

The files and a host's share of their records are flaxtrain/text_files.py's. The shares are the mesh's distinct
row sets (`parallel.host_share`): hosts that hold the same rows (replicas along
`tensor`) read the same share.
"""

import sys
from collections.abc import Callable, Sequence

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset, WindowShuffleIterDataset

from flaxtrain import packing, parallel
from flaxtrain.text_files import TextRecords

TEXTS_PER_ENCODE = 256  # records tokenized in one call of the (batched, fast) tokenizer


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
        return {k: packing.padded([block.get(k, ()) for block in blocks], length, value)[0] for k, value in pad.items()}
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

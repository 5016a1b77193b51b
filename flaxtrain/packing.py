"""Laying variable-length examples (supervised fine-tuning: input_ids and a loss mask) into fixed-width rows.

Packed: several examples share a row of exactly `block_size` tokens, placed by best-fit decreasing (BFD), as TRL's
`pack_dataset(strategy="bfd")` does: the longest example first, each into the open row with the least room that
still fits it, a new row when none does. An example is never cut. Padded: one example a row, a batch padded to the
smallest of a few bucket widths that fits its longest row, its examples grouped by length.

Either way a batch is the same dict of [B, T] arrays:
  input_ids    int32    the tokens, `pad_id` after the last example of a row;
  weights      float32  the weight of token t *as a target*: the example's loss mask, 0 on padding and on the first
                        token of every example (nothing in its segment predicts it);
  segment_ids  int32    1, 2, 3... for the examples of a row in order, 0 on padding;
  positions    int32    0, 1, 2... restarting at each example; 0 on padding.
The weights follow TRL's convention (labels = input_ids with -100 where the mask is 0, shifted inside the model):
the mask of token t + 1 decides whether predicting it from position t is trained. `next_token_weights` turns them
into the weight of the prediction made at each position, never across two examples nor onto padding; the model
attends within a segment only and takes the positions for its position embeddings.

Determinism: a plan depends on the lengths alone (ties broken by example index), so every host and a resumed run
build the same rows.
"""

import collections
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from flaxtrain import data

# RNG stream tag of the order of the length-grouped batches in an epoch: [seed, 7, epoch] (data.RNG_STREAMS lists
# the others; the examples' order itself is data's "data order" stream, [seed, 1, epoch]).
BATCH_ORDER = 7


# ------------------------------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class PackingPlan:
    """Which examples each packed row holds: row r holds `examples[row_starts[r]:row_starts[r + 1]]`, longest
    first. Empty examples are in no row (they have nothing to train on)."""
    examples: np.ndarray  # [E] int64 example indices, row after row
    row_starts: np.ndarray  # [R + 1] int64
    block_size: int
    real_tokens: int

    @property
    def num_rows(self) -> int:
        return len(self.row_starts) - 1

    @property
    def fill(self) -> float:
        """The share of real tokens (not padding) in the rows."""
        return self.real_tokens / (self.num_rows * self.block_size) if self.num_rows else 0.0

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(example indices of `rows`, row after row [E'], how many each row holds [len(rows)])."""
        rows = np.asarray(rows, np.int64)
        counts = self.row_starts[rows + 1] - self.row_starts[rows]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return self.examples[np.repeat(self.row_starts[rows], counts) + within], counts


def plan_packing(lengths: Sequence[int], block_size: int) -> PackingPlan:
    """Best-fit decreasing over the examples' token counts [N]; O(N log N) for the sort.

    Open rows wait in a queue per free space; bit s of `free` says that queue s is not empty, so the best fit for n
    tokens is the lowest set bit at or above n, found by C-speed integer operations (a row has at most block_size
    free tokens: block_size / 64 machine words). The rows are those of TRL's segment tree over the free spaces, with
    the same ties (the oldest row of a free space first), found 3.6 times faster in Python.
    """
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if len(lengths) and lengths.max() > block_size:
        longest = int(lengths.argmax())
        raise ValueError(f"Example {longest} has {lengths[longest]} tokens, more than block_size={block_size}: "
                         f"truncate the examples first.")
    order = np.argsort(-lengths, kind="stable")  # longest first, ties by example index
    order = order[lengths[order] > 0]
    waiting = [collections.deque() for _ in range(block_size)]  # [s]: open rows with exactly s tokens free
    free = 0
    members: list[list[int]] = []
    for index, n in zip(order.tolist(), lengths[order].tolist()):
        fits = free >> n
        if fits:
            space = n + (fits & -fits).bit_length() - 1  # the lowest set bit: the tightest row that fits
            queue = waiting[space]
            row = queue.popleft()
            if not queue:
                free ^= 1 << space
        else:
            row, space = len(members), block_size
            members.append([])
        members[row].append(index)
        if space > n:
            waiting[space - n].append(row)
            free |= 1 << (space - n)
    counts = np.fromiter(map(len, members), np.int64, len(members))
    return PackingPlan(examples=np.fromiter(itertools.chain.from_iterable(members), np.int64, len(order)),
                       row_starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       block_size=block_size, real_tokens=int(lengths.sum()))


def pack(input_ids: Sequence, loss_mask: Optional[Sequence], block_size: int,
         pad_id: int) -> tuple[dict[str, np.ndarray], PackingPlan]:
    """All examples packed at once: ({input_ids, weights, segment_ids, positions: [R, block_size]}, the plan).
    For a large set, keep the plan and build each batch's rows with `packed_batch` instead (R x block_size x 16
    bytes: 5 GB for a million examples of 300 tokens)."""
    plan = plan_packing([len(ids) for ids in input_ids], block_size)
    return rows_of([input_ids[i] for i in plan.examples],
                   None if loss_mask is None else [loss_mask[i] for i in plan.examples],
                   np.diff(plan.row_starts), block_size, pad_id), plan


def packed_batch(examples, plan: PackingPlan, rows: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """The packed `rows` of `plan` [b] as a batch of [b, block_size] arrays. `examples[list of indices]` gives
    columns "input_ids" and "loss_mask" (a datasets.Dataset does)."""
    indices, counts = plan.take(rows)
    got = examples[indices.tolist()]
    return rows_of(got["input_ids"], got["loss_mask"], counts, plan.block_size, pad_id)


def next_token_weights(weights, segment_ids, xp=np):
    """[..., T] -> [..., T]: the weight of predicting token t + 1 at position t, that is weights[t + 1] where
    segment_ids[t + 1] == segment_ids[t] != 0, else 0 (and 0 at the last position). `xp` is numpy or jax.numpy:
    the same operations either way, so a jitted step calls it with jnp."""
    same = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., 1:] != 0)
    return xp.concatenate([xp.where(same, weights[..., 1:], 0), xp.zeros_like(weights[..., :1])], axis=-1)


# ------------------------------------------------------------------------------------------------- padding
def bucket_lengths(max_len: int, smallest: int = 16, per_octave: int = 1) -> list[int]:
    """Widths a padded batch may have, capped at max_len: from `smallest`, `per_octave` geometric steps from one
    power of two to the next, each rounded up to a multiple of `smallest`; and max_len. per_octave=1 is
    run_flax_glue.py's rule (powers of two from 16): few compiled shapes, log2(max_len / smallest) + 1, for up to
    half of a row padding; each step more per octave is as many shapes again for less padding."""
    widths, k = {max_len}, 0
    while (width := smallest * math.ceil(2 ** (k / per_octave))) < max_len:  # (2 ** whole numbers are exact)
        widths.add(width)
        k += 1
    return sorted(widths)


def fitted_widths(lengths: np.ndarray, count: int, max_len: int, multiple: int = 16) -> list[int]:
    """At most `count` widths that fit the data's `lengths`: the length under which each count-th share of the
    examples falls, rounded up to a multiple of `multiple`, capped at max_len. Each width is one more compiled
    shape: fitted to the data, a few of them leave less padding than powers of two from 16 do (a document of 130
    tokens pads to 144, not 256), and none is compiled for lengths the data does not have."""
    shares = np.quantile(np.asarray(lengths), np.arange(1, count + 1) / count, method="higher")
    return sorted({min(max_len, multiple * math.ceil(max(int(q), 1) / multiple)) for q in shares})


def bucket_width(buckets: list[int], lengths: np.ndarray) -> int:
    """The smallest bucket that fits the longest of `lengths`: those of a whole global batch, so that every host
    pads its rows of the batch to the same width."""
    return next(b for b in buckets if b >= np.max(lengths))


def padded(rows, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ([n, width] int32 ids padded at the end with pad_id, [n, width] bool: real tokens)."""
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    real = np.arange(width) < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, np.int32)
    ids[real] = np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lengths.sum()))
    return ids, real


def length_grouped_batches(lengths: np.ndarray, global_batch: int, seed: int, start_step: int, total_steps: int,
                           group: int = 50) -> Iterator[tuple[int, int, np.ndarray]]:
    """As data.epoch_batches (epoch, batch index in epoch, index array), with examples of similar length together.

    Each epoch takes data's order of the examples, cuts it into groups of `group` batches, sorts each group by
    length (longest first, ties by position) and cuts it into batches, then shuffles all the epoch's batches
    ([seed, BATCH_ORDER, epoch]): padding falls to what the bucket adds, while which examples meet still changes
    every epoch, and the lengths do not rise and fall with a pattern along the steps.
    """
    lengths = np.asarray(lengths)
    steps_per_epoch = len(lengths) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(lengths)} examples make no batch of {global_batch}.")
    step = start_step
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        order = np.concatenate([indices for _, indices in data.train_batches(len(lengths), global_batch, seed, epoch)])
        span = group * global_batch
        for begin in range(0, len(order), span):
            chunk = order[begin:begin + span]
            order[begin:begin + span] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = order.reshape(steps_per_epoch, global_batch)
        batches = batches[np.random.default_rng([seed, BATCH_ORDER, epoch]).permutation(steps_per_epoch)]
        for i in range(first, steps_per_epoch):
            if step == total_steps:
                return
            yield epoch, i, batches[i]
            step += 1


def padded_batch(examples, indices: np.ndarray, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Examples `indices` [b] one a row, as a batch of [b, width] arrays (width: see bucket_width).
    `examples[list of indices]` gives columns "input_ids" and "loss_mask" (a datasets.Dataset does)."""
    got = examples[np.asarray(indices).tolist()]
    return rows_of(got["input_ids"], got["loss_mask"], np.ones(len(indices), np.int64), width, pad_id)


# ------------------------------------------------------------------------------------------------- layout
def rows_of(input_ids: Sequence, loss_mask: Optional[Sequence], examples_per_row: np.ndarray, width: int,
            pad_id: int) -> dict[str, np.ndarray]:
    """Examples laid out in order, `examples_per_row[r]` of them in row r, as [R, width] arrays (see the module
    docstring). loss_mask None: every token is a target. Vectorized over the tokens: no loop over examples."""
    examples_per_row = np.asarray(examples_per_row, np.int64)
    num_rows = len(examples_per_row)
    lengths = np.fromiter(map(len, input_ids), np.int64, len(input_ids))
    total = int(lengths.sum())
    row_tokens = np.bincount(np.repeat(np.arange(num_rows), examples_per_row), lengths, num_rows).astype(np.int64)
    if num_rows and row_tokens.max() > width:
        raise ValueError(f"A row of {row_tokens.max()} tokens does not fit in {width}.")
    tokens = np.fromiter(itertools.chain.from_iterable(input_ids), np.int32, total)
    if loss_mask is None:
        mask = np.ones(total, np.float32)
    elif not np.array_equal(np.fromiter(map(len, loss_mask), np.int64, len(loss_mask)), lengths):
        raise ValueError("An example's loss_mask is not as long as its input_ids.")
    else:
        mask = np.fromiter(itertools.chain.from_iterable(loss_mask), np.float32, total)
    # [total] each token's place in its example, and its example's number in its row (from 1)
    position = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    first_of_row = np.repeat(np.cumsum(examples_per_row) - examples_per_row, examples_per_row)
    segment = np.repeat(np.arange(len(lengths)) - first_of_row + 1, lengths)

    # The tokens are row after row, each row's from its start: a boolean mask fills them in that (C) order.
    real = np.arange(width) < row_tokens[:, None]  # [R, width]
    batch = {"input_ids": np.full((num_rows, width), pad_id, np.int32),
             "weights": np.zeros((num_rows, width), np.float32),
             "segment_ids": np.zeros((num_rows, width), np.int32),
             "positions": np.zeros((num_rows, width), np.int32)}
    batch["input_ids"][real] = tokens
    batch["weights"][real] = np.where(position > 0, mask, 0)  # an example's first token is no one's target
    batch["segment_ids"][real] = segment
    batch["positions"][real] = position
    return batch

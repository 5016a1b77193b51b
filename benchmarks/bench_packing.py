#!/usr/bin/env python
"""How much of the compute goes to real tokens when fine-tuning on conversations: packed rows (best-fit decreasing,
flaxtrain/packing.py) against one conversation a row, padded to the block, or to the longest row of its batch.

    python benchmarks/bench_packing.py [--examples 20000] [--block_size 2048] [--median 300] [--sigma 1.0]
                                       [--batch 64] [--scale 1000000]

The conversations are generated: log-normal token counts (median --median, log-sd --sigma), cut to the block, the
loss on the last 40% of each (the answer; the prompt before it is context only). No model: the figures are the
shares of a batch's token slots [rows x width] that hold real tokens and trained targets (next-token weights), and
the seconds that packing takes. Padded batches hold --batch conversations, taken in data's epoch order ("plain") or
grouped by length (`packing.length_grouped_batches`), at the longest row's width ("exact": a compiled shape for
every width) or at the smallest bucket that fits (`packing.bucket_lengths`: from 16, 1, 2 or 4 steps from one power
of two to the next). `--scale` times the packing plan alone for that many conversations (0: skip). The token slots
measure the matmul work; attention over a packed row of 2048 costs 2048^2 where a kernel does not skip the pairs
that the segments mask, more than the padded short rows' attention.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxtrain import data, packing  # noqa: E402

PAD, SEED, ANSWER = 0, 0, 0.4


def conversation_lengths(n: int, block_size: int, median: float, sigma: float, seed: int = SEED) -> np.ndarray:
    """[n] log-normal token counts, cut to the block."""
    rng = np.random.default_rng([seed, 0])
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, block_size).astype(int)


def conversations(n: int, block_size: int, median: float, sigma: float, vocab_size: int = 32000):
    """(lengths, input_ids, loss_mask) of n generated conversations: the loss on the last 40% of each."""
    lengths = conversation_lengths(n, block_size, median, sigma)
    rng = np.random.default_rng([SEED, 1])
    input_ids = [rng.integers(1, vocab_size, k).tolist() for k in lengths]
    loss_mask = [[0] * (k - int(round(ANSWER * k))) + [1] * int(round(ANSWER * k)) for k in lengths]
    return lengths, input_ids, loss_mask


def seconds(fn, repeats: int = 3):
    """(result, best wall-clock seconds of `repeats` calls): the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def padded_row(name, batches, lengths, targets, width_of):
    """One table row for one-a-row batches: the slots are each batch's rows x its width."""
    widths = [width_of(lengths[b]) for b in batches]
    slots = sum(w * len(b) for w, b in zip(widths, batches))
    used = np.concatenate(batches)
    return dict(layout=name, rows=len(used), width=f"{min(widths)}-{max(widths)} ({len(set(widths))} shapes)",
                slots=slots, real=lengths[used].sum() / slots, trained=targets[used].sum() / slots)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--median", type=float, default=300)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64, help="conversations in a padded batch")
    parser.add_argument("--scale", type=int, default=1_000_000, help="conversations for the plan's timing alone")
    args = parser.parse_args(argv)
    T = args.block_size

    lengths, input_ids, loss_mask = conversations(args.examples, T, args.median, args.sigma)
    # An example's trained targets: its mask without the first token (no one predicts it).
    targets = np.array([sum(m[1:]) for m in loss_mask])
    print(f"{args.examples} conversations: tokens median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}, {np.mean(lengths == T):.1%} cut to {T}")

    plan, plan_s = seconds(lambda: packing.plan_packing(lengths, T))
    (rows, _), pack_s = seconds(lambda: packing.pack(input_ids, loss_mask, T, PAD))
    trained = packing.next_token_weights(rows["weights"], rows["segment_ids"]).sum() / rows["weights"].size
    table = [dict(layout="packed (BFD)", rows=plan.num_rows, width=str(T), slots=rows["weights"].size,
                  real=plan.fill, trained=trained)]

    table.append(padded_row(f"padded to {T}", [np.arange(args.examples)], lengths, targets, lambda _: T))
    steps = args.examples // args.batch
    plain = [b for _, _, b in data.epoch_batches(args.examples, args.batch, SEED, 0, steps)]
    grouped = [b for _, _, b in packing.length_grouped_batches(lengths, args.batch, SEED, 0, steps)]
    for name, batches in (("plain", plain), ("length-grouped", grouped)):
        table.append(padded_row(f"{name}, exact", batches, lengths, targets, np.max))
        for per_octave in (1, 2, 4):
            buckets = packing.bucket_lengths(T, per_octave=per_octave)
            table.append(padded_row(f"{name}, buckets ({per_octave} an octave)", batches, lengths, targets,
                                    lambda ls: packing.bucket_width(buckets, ls)))

    print(f"| layout | rows | width | real tokens | trained targets | token slots, x packed |\n| --- |{' --- |' * 5}")
    for row in table:
        print(f"| {row['layout']} | {row['rows']} | {row['width']} | {row['real']:.1%} | {row['trained']:.1%} | "
              f"{row['slots'] / table[0]['slots']:.2f} |")
    print(f"packing {args.examples}: plan {plan_s:.3f} s, plan + all rows laid out {pack_s:.3f} s "
          f"({plan.num_rows * T / pack_s / 1e6:.0f} M token slots/s)")
    if args.scale:
        many = conversation_lengths(args.scale, T, args.median, args.sigma, seed=SEED + 1)
        big, big_s = seconds(lambda: packing.plan_packing(many, T), repeats=1)
        print(f"plan of {args.scale} conversations: {big_s:.2f} s, {big.num_rows} rows, {big.fill:.2%} real tokens")


if __name__ == "__main__":
    main()

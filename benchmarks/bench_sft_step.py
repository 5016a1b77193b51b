#!/usr/bin/env python
"""Real tokens per second of run_clm_flax.py's train step when fine-tuning on conversations: packed rows (BFD)
against one conversation a row, padded to the bucket of a length-grouped batch's longest or to the block.

    python benchmarks/bench_sft_step.py [--config llama-mini] [--examples 192] [--block_size 512] [--median 75]
                                        [--batch 8] [--rounds 3]
    python benchmarks/bench_sft_step.py --config llama-1b --dtype bfloat16 --gradient_checkpointing \
        --block_size 2048 --median 300 --examples 2048 --batch 8       # an accelerator-sized run

The conversations are bench_packing.py's (log-normal token counts, the loss on the last 40% of each). The defaults
are that benchmark's scaled to a 2-core CPU: a block of 512 and a median of 75 tokens keep its median/block ratio
(300/2048) and its log-sd. The layouts, --batch rows a step in each as run_clm_flax.py's batch: packed rows in
data's epoch order; one conversation a row in `packing.length_grouped_batches`, padded to the smallest of
`packing.bucket_lengths(block)` that fits the longest (run_clm_flax.py's --packing=false); one a row in data's
epoch order, padded to the block. The model and its step are bench_train_step.py's (`train_setup`: the script's
train_step jitted with the state's shardings). Each distinct batch shape is compiled once before the rounds, timed;
packed rows and rows padded to the block have the same shape, one program.

A round times an epoch of the same conversations in each layout in turn (the order rotated each round: the machine
is noisy), until the last step's state is ready. Padded to the block, every step has the same shape and no work
depends on the data, so --block_steps of its steps (default: as many as the packed epoch has) stand for its epoch:
its epoch seconds are theirs scaled to its steps. "Real tokens" are an epoch's non-padding tokens, "trained
targets" its predictions with a weight (`packing.next_token_weights`); a token slot is one of a batch's rows x width.
"""

import argparse
import os
import statistics
import sys
import time

import datasets
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_packing import PAD, SEED, conversations  # noqa: E402
from bench_train_step import CONFIGS, train_setup  # noqa: E402
from flaxtrain import data, packing, parallel  # noqa: E402

PACKED, BUCKET = "packed (BFD)", "padded to bucket"


def epoch_layouts(examples, lengths: np.ndarray, block_size: int, batch: int) -> dict[str, list[dict]]:
    """{layout: one epoch's host batches [batch, width]} over the same conversations, as run_clm_flax.py builds
    them (an epoch's last incomplete batch dropped)."""
    plan = packing.plan_packing(lengths, block_size)
    buckets = packing.bucket_lengths(block_size)
    n = len(lengths)
    return {
        PACKED: [packing.packed_batch(examples, plan, rows, PAD)
                 for _, _, rows in data.epoch_batches(plan.num_rows, batch, SEED, 0, plan.num_rows // batch)],
        BUCKET: [packing.padded_batch(examples, indices, packing.bucket_width(buckets, lengths[indices]), PAD)
                 for _, _, indices in packing.length_grouped_batches(lengths, batch, SEED, 0, n // batch)],
        f"padded to {block_size}": [packing.padded_batch(examples, indices, block_size, PAD)
                                    for _, _, indices in data.epoch_batches(n, batch, SEED, 0, n // batch)],
    }


def width(batch) -> int:
    return batch["input_ids"].shape[1]


def compile_shapes(step, abstract_state, rng, widths, batch: int, mesh) -> tuple[dict, dict]:
    """({width: the step compiled for [batch, width] batches}, {width: compile seconds})."""
    sharding = parallel.batch_sharding(mesh)
    types = {"input_ids": jnp.int32, "weights": jnp.float32, "segment_ids": jnp.int32, "positions": jnp.int32}
    programs, seconds = {}, {}
    for w in sorted(widths):
        abstract = {k: jax.ShapeDtypeStruct((batch, w), t, sharding=sharding) for k, t in types.items()}
        start = time.perf_counter()
        programs[w] = step.lower(abstract_state, abstract, rng).compile()
        seconds[w] = time.perf_counter() - start
    return programs, seconds


def run_steps(programs, state, batches, rng):
    """(state, seconds) of a step on each of `batches` (on the devices), until the last step's state is ready."""
    start = time.perf_counter()
    for batch in batches:
        state, metrics = programs[width(batch)](state, batch, rng)
    jax.block_until_ready((state, metrics))
    return state, time.perf_counter() - start


def summary(name, batches, epoch_seconds) -> dict:
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    trained = sum(float(packing.next_token_weights(b["weights"], b["segment_ids"]).sum()) for b in batches)
    median, best = statistics.median(epoch_seconds), min(epoch_seconds)
    return dict(name=name, steps=len(batches), widths=sorted({width(b) for b in batches}), real=real,
                trained=trained, slots=sum(b["input_ids"].size for b in batches), median=median, best=best,
                speed=real / median, speeds=[real / s for s in epoch_seconds])


def packed_over(row, packed) -> list[float]:
    """Packed real tokens/s over this layout's, round by round (the two epochs ran minutes apart at most)."""
    return [p / s for p, s in zip(packed["speeds"], row["speeds"])]


def print_table(rows):
    print("| layout | steps | widths (programs) | real tokens | trained targets | real share of slots | epoch s, "
          "median (min) | real tokens/s, median (best) | trained targets/s | token slots/s | "
          "packed / this, median of rounds |\n"
          f"| --- |{' --- |' * 10}")
    for row in rows:
        w = row["widths"]
        print(f"| {row['name']} | {row['steps']} | {w[0]}{f'-{w[-1]}' if len(w) > 1 else ''} ({len(w)}) | "
              f"{row['real']} | {row['trained']:.0f} | {row['real'] / row['slots']:.1%} | {row['median']:.1f} "
              f"({row['best']:.1f}) | {row['speed']:.0f} ({row['real'] / row['best']:.0f}) | "
              f"{row['trained'] / row['median']:.0f} | {row['slots'] / row['median']:.0f} | "
              f"{statistics.median(packed_over(row, rows[0])):.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(k for k in CONFIGS if k.startswith("llama")), default="llama-mini")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--examples", type=int, default=192, help="conversations: an epoch of them a layout")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--median", type=float, default=75, help="median tokens of a conversation")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-sd of the tokens of a conversation")
    parser.add_argument("--batch", type=int, default=8, help="rows a step (the global batch), in every layout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block_steps", type=int, default=0,
                        help="padded to the block: steps timed a round (0: as many as the packed epoch has)")
    args = parser.parse_args(argv)
    T, B = args.block_size, args.batch

    setup = train_setup(args.config, jnp.dtype(args.dtype), args.gradient_checkpointing)
    lengths, input_ids, loss_mask = conversations(args.examples, T, args.median, args.sigma,
                                                  setup.hf_config.vocab_size)
    examples = datasets.Dataset.from_dict({"input_ids": input_ids, "loss_mask": loss_mask})
    layouts = epoch_layouts(examples, lengths, T, B)
    block_name = list(layouts)[2]
    timed = {name: len(batches) for name, batches in layouts.items()}
    timed[block_name] = min(args.block_steps or timed[PACKED], timed[block_name])

    abstract_state = setup.layout.abstract_state()
    rng = jax.device_put(jax.random.key(1), parallel.replicated(setup.mesh))
    widths = {width(b) for batches in layouts.values() for b in batches}
    programs, compile_s = compile_shapes(setup.step, abstract_state, rng, widths, B, setup.mesh)
    state = setup.layout.create(setup.layout.init(jax.random.key(0)))
    on_devices = {name: [parallel.to_global(b, setup.mesh, B) for b in batches[:timed[name]]]
                  for name, batches in layouts.items()}
    for w in sorted(widths):  # a first step of every shape before the rounds
        state, _ = run_steps(programs, state, [next(b for bs in on_devices.values() for b in bs if width(b) == w)], rng)

    epoch_s = {name: [] for name in layouts}
    names = list(layouts)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            state, s = run_steps(programs, state, on_devices[name], rng)
            epoch_s[name].append(s * len(layouts[name]) / timed[name])

    params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    print(f"{args.config} ({params / 1e6:.1f} M params, {args.dtype}{', remat' if args.gradient_checkpointing else ''})"
          f" on {jax.device_count()} x {jax.devices()[0].device_kind}; {args.examples} conversations: tokens median "
          f"{np.median(lengths):.0f}, mean {lengths.mean():.0f}, max {lengths.max()}; block {T}, {B} rows a step; "
          f"{args.rounds} rounds; padded to {T}: {timed[block_name]} of {len(layouts[block_name])} steps timed")
    print("compile s by width: " + ", ".join(f"{w}: {s:.1f}" for w, s in sorted(compile_s.items()))
          + f" ({len(compile_s)} programs; packed and padded to {T} share the {T} one)")
    rows = [summary(name, batches, epoch_s[name]) for name, batches in layouts.items()]
    print_table(rows)
    print("epoch s of each round: " + "; ".join(f"{name} " + ", ".join(f"{s:.1f}" for s in epoch_s[name])
                                                for name in layouts))
    print("packed / this of each round: " + "; ".join(
        f"{row['name']} " + ", ".join(f"{x:.2f}" for x in packed_over(row, rows[0])) for row in rows[1:]))
    return rows


if __name__ == "__main__":
    main()

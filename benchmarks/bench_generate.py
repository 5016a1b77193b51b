#!/usr/bin/env python
"""Times summary generation (flaxtrain.generate_seq2seq.generate) of an encoder-decoder model on the devices at
hand: greedy and beam search, the way run_summarization_flax.py runs it (one compiled shape, all devices).

    python benchmarks/bench_generate.py --config bart-small [--beams 1 4] [--batch 8] [--repeats 3]

Random weights never say when to stop, so every summary runs to --new_tokens (the end-of-sequence token is
switched off): the figures are for full-length summaries, the slowest case. Prints, per beam count, the first call
(compile + one run) and the steady summaries/second and new tokens/second.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import numpy as np
import optax
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_train_step import CONFIGS  # noqa: E402  (this folder is on sys.path when run as a script)
from flaxtrain import generate_seq2seq, models, parallel  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[c for c, s in CONFIGS.items() if s["type"] in ("t5", "bart")],
                        default="bart-small")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch", type=int, default=8, help="global batch (summaries per call)")
    parser.add_argument("--source", type=int, default=None, help="input length (default: the config's)")
    parser.add_argument("--new_tokens", type=int, default=None, help="summary length (default: the config's target)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    spec = CONFIGS[args.config]
    source, new_tokens = args.source or spec["seq"], args.new_tokens or spec["target"]
    hf_config = AutoConfig.for_model(spec["type"], **spec["model"])
    family, model = models.create(hf_config, "Seq2SeqLM")
    layout = parallel.StateLayout(model, family.init_params, optax.identity(), parallel.make_mesh(), parallel.RULES)
    mesh, params = layout.mesh, layout.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    host = {"input_ids": rng.integers(3, hf_config.vocab_size, (args.batch, source)).astype(np.int32),
            "attention_mask": np.ones((args.batch, source), np.int32)}
    batch = parallel.to_global(host, mesh, args.batch)

    for beams in args.beams:
        def step(params, input_ids, attention_mask, beams=beams):
            return generate_seq2seq.generate(model, params, input_ids, attention_mask, max_new_tokens=new_tokens,
                                             num_beams=beams, eos_token_id=())

        run = functools.partial(layout.params_step(step, batch_args=2), params, batch["input_ids"],
                                batch["attention_mask"])
        started = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(run())
        seconds = (time.perf_counter() - started) / args.repeats
        print(json.dumps({"config": args.config, "num_beams": beams, "batch": args.batch, "source": source,
                          "new_tokens": new_tokens, "devices": jax.device_count(), "first_call_s": round(first, 2),
                          "s_per_batch": round(seconds, 3), "summaries_per_s": round(args.batch / seconds, 2),
                          "new_tokens_per_s": round(args.batch * new_tokens / seconds, 1)}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Times generation on the devices at hand, the way the scripts run it: summaries of an encoder-decoder
(flaxtrain.generate_seq2seq, greedy and beam search, as run_summarization_flax.py) or continuations of a decoder's
prompts (flaxtrain.generate, greedy, as run_clm_flax.py --do_predict); optionally side by side with the original.

    python benchmarks/bench_generate.py --config bart-small [--beams 1 4] [--batch 8] [--repeats 3]
    python benchmarks/bench_generate.py --config gpt2-small --source 64 --new_tokens 64 \
        --original DRIVER --original_python $ANCHOR_VENV/bin/python [--rounds 2]

Random weights never say when to stop, so every row runs to --new_tokens (the end-of-sequence token is switched
off): the figures are for full-length outputs, the slowest case. Per beam count it prints the compile time
(tracing and XLA, apart from any run), the first call, the steady new tokens/second, and ms per generated token: a
call's seconds (encoder or prompt pass included) over --new_tokens, for the whole batch.

--original DRIVER runs the original Hugging Face Flax `generate` (transformers 4.57, e.g. ../shared/bench's anchor
environment) in a second process with that environment's python: DRIVER is a script outside this project that
speaks the protocol of `Original` below. It gets this side's weights (an HF export) and inputs, and runs with no
end-of-sequence token either (and no forced one), so both sides generate exactly the same number of tokens. The
two processes take turns (ours, then the original's, per round and beam count; never both at once), and a table
gives both sides' ms per token, their ratio, compile seconds, and how many of the tokens were the same.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_train_step import CONFIGS  # noqa: E402  (this folder is on sys.path when run as a script)
from flaxtrain import generate, generate_seq2seq, hf_export, models, parallel  # noqa: E402

SEQ2SEQ, DECODERS = ("t5", "bart"), ("gpt2", "llama")


class Original:
    """The original's generate in a subprocess: `python DRIVER CHECKPOINT_DIR`, where CHECKPOINT_DIR holds an HF
    export and inputs.npz (input_ids, attention_mask). The driver prints one JSON line when ready, then answers each
    request line {"num_beams", "new_tokens", "calls"} with {"compile_s": s, "seconds": [calls], "tokens": [B x
    new_tokens]}: compile_s the tracing and compiling of that request's generate (0 once compiled)."""

    def __init__(self, python: str, driver: str, checkpoint: str):
        self.process = subprocess.Popen([python, driver, checkpoint], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the original's driver exited (code {self.process.wait()}); see its stderr above")
        return json.loads(line)

    def run(self, num_beams: int, new_tokens: int, calls: int) -> dict:
        self.process.stdin.write(json.dumps({"num_beams": num_beams, "new_tokens": new_tokens, "calls": calls}) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def timed(run, calls: int) -> tuple[list[float], np.ndarray]:
    """Seconds of each of `calls` calls of run(), and the last call's output as numpy."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        out = jax.block_until_ready(run())
        seconds.append(time.perf_counter() - started)
    return seconds, np.asarray(parallel.fetch(out))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[c for c, s in CONFIGS.items() if s["type"] in SEQ2SEQ + DECODERS],
                        default="bart-small")
    parser.add_argument("--beams", type=int, nargs="+", default=None,
                        help="beam counts (default: 1 4 for encoder-decoders; decoders have greedy only: 1)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sources or prompts per call)")
    parser.add_argument("--source", type=int, default=None, help="input or prompt length (default: the config's)")
    parser.add_argument("--new_tokens", type=int, default=None,
                        help="tokens generated per row (default: the config's target, or 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side, beam count and round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of timed calls (sides alternate in each)")
    parser.add_argument("--original", default=None, metavar="DRIVER",
                        help="script that times the original's generate (see the docstring)")
    parser.add_argument("--original_python", default=os.environ.get("ANCHOR_PY"),
                        help="python of the original's environment (default: $ANCHOR_PY)")
    args = parser.parse_args(argv)
    decoder = CONFIGS[args.config]["type"] in DECODERS
    args.beams = args.beams or ([1] if decoder else [1, 4])
    if decoder and args.beams != [1]:
        parser.error("--beams: decoder-only generation (flaxtrain/generate.py) is greedy; use --beams 1")
    if min(args.beams) < 1:
        parser.error("--beams: beam counts must be at least 1")
    if args.original and not args.original_python:
        parser.error("--original_python: the original's python is needed with --original (or set $ANCHOR_PY)")
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    spec = CONFIGS[args.config]
    decoder = spec["type"] in DECODERS
    source, new_tokens = args.source or spec["seq"], args.new_tokens or spec.get("target", 64)
    hf_config = AutoConfig.for_model(spec["type"], **spec["model"])
    family, model = models.create(hf_config, "CausalLM" if decoder else "Seq2SeqLM")
    layout = parallel.StateLayout(model, family.init_params, optax.identity(), parallel.make_mesh(), parallel.RULES)
    mesh, params = layout.mesh, layout.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    host = {"input_ids": rng.integers(3, hf_config.vocab_size, (args.batch, source)).astype(np.int32),
            "attention_mask": np.ones((args.batch, source), np.int32)}
    batch = parallel.to_global(host, mesh, args.batch)

    def compile_call(beams):
        """(seconds to trace and compile, a zero-argument call of the compiled generate), compiled as the scripts
        compile it: run_summarization_flax.py's params_step, or run_clm_flax.py's call of generate (whose own jit
        is what this one compiles)."""
        if decoder:
            def step(params, input_ids, attention_mask):
                return generate.generate(model, params, input_ids, attention_mask, max_new_tokens=new_tokens,
                                         eos_token_id=None)
            jitted = jax.jit(step)
        else:
            def step(params, input_ids, attention_mask):
                return generate_seq2seq.generate(model, params, input_ids, attention_mask, max_new_tokens=new_tokens,
                                                 num_beams=beams, eos_token_id=())
            jitted = layout.params_step(step, batch_args=2)
        arguments = (params, batch["input_ids"], batch["attention_mask"])
        started = time.perf_counter()
        compiled = jitted.lower(*arguments).compile()
        return time.perf_counter() - started, functools.partial(compiled, *arguments)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as checkpoint:
        original = None
        if args.original:
            hf_export.save_pretrained(checkpoint, params, hf_config, architecture=model.hf_architecture)
            np.savez(os.path.join(checkpoint, "inputs.npz"), **host)
            original = Original(args.original_python, args.original, checkpoint)
            print(json.dumps({"original": original.ready}), flush=True)
        try:
            results = measure(args, compile_call, original, source, new_tokens)
        finally:
            if original is not None:
                original.close()
    if original is not None:
        print_table(args, results, source, new_tokens)


def measure(args, compile_call, original, source: int, new_tokens: int) -> dict:
    """{beams: {"ours"/"original": {"compile": s, "first": s, "steady": [median s per round]}, "same": fraction}}:
    compilation and a first call of every beam count, then per round each beam count's timed calls, ours then the
    original's."""
    results, runs = {}, {}
    for beams in args.beams:
        compile_s, runs[beams] = compile_call(beams)
        first, tokens = timed(runs[beams], 1)
        results[beams] = {"ours": {"compile": compile_s, "first": first[0], "steady": []}}
        if original is not None:
            reply = original.run(beams, new_tokens, 1)
            results[beams]["original"] = {"compile": reply["compile_s"], "first": reply["seconds"][0], "steady": []}
            results[beams]["same"] = float(np.mean(tokens == np.asarray(reply["tokens"])))
    for round_index in range(args.rounds):
        for beams in args.beams:
            seconds, _ = timed(runs[beams], args.repeats)
            sides = [("ours", statistics.median(seconds))]
            if original is not None:
                sides.append(("original", statistics.median(original.run(beams, new_tokens, args.repeats)["seconds"])))
            line = {"config": args.config, "round": round_index + 1, "num_beams": beams, "batch": args.batch,
                    "source": source, "new_tokens": new_tokens, "devices": jax.device_count()}
            for side, s in sides:
                results[beams][side]["steady"].append(s)
                line.update({f"{side}_compile_s": round(results[beams][side]["compile"], 2),
                             f"{side}_first_call_s": round(results[beams][side]["first"], 2),
                             f"{side}_s_per_batch": round(s, 3),
                             f"{side}_ms_per_token": round(1000 * s / new_tokens, 2),
                             f"{side}_new_tokens_per_s": round(args.batch * new_tokens / s, 1)})
            print(json.dumps(line), flush=True)
    return results


def print_table(args, results: dict, source: int, new_tokens: int):
    """Markdown rows, one per beam count and round. ms/token: one call's seconds (median of --repeats) over
    new_tokens, for the whole batch; compile s: tracing and compiling (jit's lower and compile), apart from the runs."""
    print("\n| config | mode | batch x input | new tokens | ours ms/token | original ms/token | original / ours "
          "| compile s ours / original | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for beams, r in results.items():
        ours, theirs = r["ours"], r["original"]
        compile_s = [side["compile"] for side in (ours, theirs)]
        for round_index, (a, b) in enumerate(zip(ours["steady"], theirs["steady"])):
            mode = "greedy" if beams == 1 else f"beam {beams}"
            print(f"| {args.config} | {mode}, round {round_index + 1} | {args.batch} x {source} | {new_tokens} | "
                  f"{1000 * a / new_tokens:.1f} | {1000 * b / new_tokens:.1f} | {b / a:.2f} | "
                  f"{compile_s[0]:.1f} / {compile_s[1]:.1f} | {r['same']:.0%} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Times what a run does when SIGTERM stops it: the orbax checkpoint of the whole training state (params and AdamW
moments) and the Hugging Face export of the model, as the training loop writes them.

    python benchmarks/bench_save.py --config bert-base [--output_dir /tmp/bench-save]

Prints JSON: the state's size, the checkpoint's seconds (started, then waited for), the export's seconds, and their
sum: how long a preempted machine must stay up after the step in flight.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import optax
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train_step import CONFIGS, TASKS  # noqa: E402
from flaxtrain import checkpoint, hf_export, models, parallel, training  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bert-base")
    parser.add_argument("--output_dir", help="where to write (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)

    spec = CONFIGS[args.config]
    hf_config = AutoConfig.for_model(spec["type"], **spec["model"])
    family, model = models.create(hf_config, TASKS[spec["type"]][0])
    params = family.init_params(model, jax.random.key(0))
    tx = optax.adamw(1e-4, weight_decay=0.01, mask=training.decay_mask)
    state = parallel.replicate(training.TrainState.create(apply_fn=model.apply, params=params, tx=tx),
                               parallel.make_mesh())
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench-save-")

    checkpoints = checkpoint.Checkpoints(output_dir)
    start = time.perf_counter()
    checkpoints.save(1, state, {"bench": True})
    started = time.perf_counter() - start
    checkpoints.wait()
    checkpoint_s = time.perf_counter() - start
    checkpoints.close()
    start = time.perf_counter()
    hf_export.save_pretrained(output_dir, parallel.fetch(state.params), hf_config, architecture=model.hf_architecture)
    export_s = time.perf_counter() - start
    if not args.output_dir:
        shutil.rmtree(output_dir)

    result = {"config": args.config, "state_GiB": round(state_bytes / 2**30, 3), "checkpoint_started_s":
              round(started, 2), "checkpoint_s": round(checkpoint_s, 2), "export_s": round(export_s, 2),
              "stop_save_s": round(checkpoint_s + export_s, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

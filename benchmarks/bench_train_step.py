#!/usr/bin/env python
"""Times the real masked-LM train step of run_mlm_flax.py on the devices at hand.

Prints the first-step (compile) time, steady-state seconds per step, tokens/second, model-FLOPs utilisation
against this machine's measured peak matmul throughput, and peak memory.

    python benchmarks/bench_train_step.py --config bert-small [--dtype bfloat16] [--steps 20]

The batch is the global batch (split over all devices). MFU counts 6 FLOPs per parameter per token for the
matrices (forward and backward; the tied output layer counted once through the word embedding) plus
12 * layers * length * hidden for attention scores, as in the PaLM paper's appendix.
"""

import argparse
import functools
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_mlm_flax  # noqa: E402
from flaxtrain import parallel, training  # noqa: E402
from flaxtrain.models import bert  # noqa: E402

CONFIGS = {
    "bert-small": dict(model=dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=1024), seq=128, batch=16),
    "bert-base": dict(model=dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072), seq=128, batch=8),
}


def peak_matmul_flops(dtype, n=4096, repeats=5) -> float:
    """Measured FLOP/s of a large square matmul on one device: the ceiling MFU is reported against."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bert-small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--batch", type=int, help="global batch (default: the config's)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args(argv)

    spec = CONFIGS[args.config]
    seq, batch = spec["seq"], args.batch or spec["batch"]
    config = bert.BertConfig(**spec["model"], max_position_embeddings=512, model_type="bert")
    dtype = jnp.dtype(args.dtype)
    model = bert.BertForMaskedLM(config, dtype=dtype, gradient_checkpointing=args.gradient_checkpointing)
    mesh = parallel.make_mesh()
    params = bert.init_params(model, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    embed = params["bert"]["embeddings"]
    matrix_params = n_params - embed["position_embeddings"]["embedding"].size - \
        embed["token_type_embeddings"]["embedding"].size
    flops_per_token = 6 * matrix_params + 12 * config.num_hidden_layers * seq * config.hidden_size

    opt_args = argparse.Namespace(adafactor=False, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                                  weight_decay=0.01, max_grad_norm=1.0)
    tx = training.make_optimizer(opt_args, 1e-4)
    state = parallel.replicate(training.TrainState.create(apply_fn=model.apply, params=params, tx=tx), mesh)
    step = parallel.data_parallel(functools.partial(run_mlm_flax.train_step, accumulation_steps=1), mesh,
                                  donate_argnums=(0,))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, config.vocab_size, (batch, seq))
    host = {"input_ids": ids.astype(np.int32), "attention_mask": np.ones((batch, seq), np.int32),
            "labels": ids.astype(np.int32), "weights": (rng.random((batch, seq)) < 0.15).astype(np.float32)}
    device_batch = parallel.to_global(host, mesh, batch)
    dropout_rng = jax.random.key(1)

    start = time.perf_counter()
    state, metrics = step(state, device_batch, dropout_rng)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, device_batch, dropout_rng)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps

    tokens_per_s = batch * seq / step_s
    peak = peak_matmul_flops(dtype) * jax.device_count()
    memory, memory_kind = peak_memory_bytes()
    result = {
        "config": args.config, "dtype": args.dtype, "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "params_M": round(n_params / 1e6, 2), "global_batch": batch, "seq": seq,
        "first_step_s": round(compile_s, 2), "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(flops_per_token * tokens_per_s / 1e12, 4),
        "peak_matmul_tflops_per_s": round(peak / 1e12, 4),
        "mfu": round(flops_per_token * tokens_per_s / peak, 4),
        "peak_memory_GiB": round(memory / 2 ** 30, 3), "memory_kind": memory_kind,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

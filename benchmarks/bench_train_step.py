#!/usr/bin/env python
"""Times the real train step of a script (run_mlm_flax.py, run_clm_flax.py, run_t5_mlm_flax.py,
run_summarization_flax.py) on the devices at hand, or plans its memory on a mesh without allocating the model.

Prints the first-step (compile) time, steady-state seconds per step, tokens/second, model-FLOPs utilisation
against this machine's measured peak matmul throughput, and peak memory.

    python benchmarks/bench_train_step.py --config bert-small [--dtype bfloat16] [--steps 20]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_train_step.py --config llama-7b \
        --fsdp 8 --compile_only [--gradient_checkpointing]

--compile_only builds the train state abstractly (jax.eval_shape), lowers and compiles the real train step for the
mesh of --fsdp and --tensor_parallel, and prints the per-device bytes of parameters and optimizer state
(`state_GiB_per_device`, from the shardings) and XLA's memory_analysis() of the compiled step (`argument_GiB`,
`temp_GiB`, `output_GiB`, per device): what the run needs on the accelerator, planned on simulated CPU devices
(llama-70b: 256 of them, `--fsdp 256` or `--fsdp 64 --tensor_parallel 4`; see benchmarks/README.md).
--compile_topology v5e-256 (implies --compile_only) compiles it instead for a TPU pod's devices, ahead of time on
this machine, with the TPU's own compiler: what the chip would plan. It needs libtpu importable (pip install
libtpu==<the version jax pins>, into a folder put on PYTHONPATH) and JAX_PLATFORMS=cpu.

The batch is the global batch (split over all devices). MFU counts 6 FLOPs per parameter per token for the
matrices (forward and backward: every parameter but the embedding lookups, plus the output layer when it is tied
to the embedding) and 12 * layers * length * width for attention, as in the PaLM paper's appendix; for T5 the
encoder's parameters count the input tokens and the decoder's the target tokens (BART likewise); the masked-LM
head counts the positions it runs on (run_mlm_flax.max_predictions per row, not every token).
"""

import argparse
import functools
import json
import math
import os
import resource
import sys
import time
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_clm_flax  # noqa: E402
import run_mlm_flax  # noqa: E402
import run_summarization_flax  # noqa: E402
import run_t5_mlm_flax  # noqa: E402
from flaxtrain import example_rng, models, parallel, training  # noqa: E402

CONFIGS = {
    "bert-small": dict(type="bert", seq=128, batch=16, model=dict(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)),
    # bert-small's shapes in RoBERTa's architecture (positions offset past the padding id), as side_by_side.sh has it.
    "roberta-small": dict(type="roberta", seq=128, batch=16, model=dict(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    "bert-base": dict(type="bert", seq=128, batch=8, model=dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "gpt2-small": dict(type="gpt2", seq=256, batch=4, model=dict(
        vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    "llama-small": dict(type="llama", seq=256, batch=4, model=dict(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
        intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=False)),
    # Llama's architecture small enough for bench_sft_step.py's several shapes and epochs on a 2-core CPU.
    "llama-mini": dict(type="llama", seq=512, batch=8, model=dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=768, max_position_embeddings=2048, tie_word_embeddings=False)),
    # The shapes of Llama-3.2-1B (its RoPE scaling aside), Llama-2-7B and GPT-2 XL, for --compile_only plans.
    "llama-1b": dict(type="llama", seq=2048, batch=8, model=dict(
        vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True)),
    "llama-7b": dict(type="llama", seq=2048, batch=8, model=dict(
        vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, max_position_embeddings=4096, tie_word_embeddings=False)),
    # Llama-2-70B: grouped-query attention (8 key/value heads), for plans of a pod (--fsdp 256, or 64 x tensor 4).
    "llama-70b": dict(type="llama", seq=2048, batch=256, model=dict(
        vocab_size=32000, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "gpt2-xl": dict(type="gpt2", seq=1024, batch=8, model=dict(
        vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024)),
    "t5-small": dict(type="t5", seq=128, target=32, batch=8, model=dict(
        vocab_size=32128, d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64)),
    "bart-small": dict(type="bart", seq=256, target=64, batch=4, model=dict(
        vocab_size=50265, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048)),
}
TASKS = {"bert": ("MaskedLM", run_mlm_flax), "roberta": ("MaskedLM", run_mlm_flax),
         "gpt2": ("CausalLM", run_clm_flax), "llama": ("CausalLM", run_clm_flax),
         "t5": ("Seq2SeqLM", run_t5_mlm_flax), "bart": ("Seq2SeqLM", run_summarization_flax)}
# Arguments a script's train_step takes besides accumulation_steps.
STEP_OPTIONS = {run_summarization_flax: dict(label_smoothing=0.0)}


def matrix_params(params, prefix=None) -> int:
    """Parameters used in matrix products: all but the embedding lookups (only those under a module named
    `prefix`, if given: T5's `encoder/...`, BART's `model/encoder/...`)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(x.size for path, x in flat
               if path[-1].key != "embedding" and (prefix is None or prefix in [p.key for p in path[:2]]))


def model_flops_per_step(params, hf_config, batch: int, seq: int, target: int = 0, predicted: int = 0) -> float:
    """Training FLOPs of one step: 6 per matrix parameter per token it sees, plus attention scores. `predicted`:
    the positions per row the output head runs on (the masked tokens of MLM; default all)."""
    width, vocab = hf_config.hidden_size, hf_config.vocab_size
    if not target:  # an encoder or a decoder: the body sees every token, the head the predicted ones
        output = vocab * width if getattr(hf_config, "tie_word_embeddings", True) else 0
        head = matrix_params(params, "cls") + matrix_params(params, "lm_head") + output
        body = 6 * (matrix_params(params) + output - head) + 12 * hf_config.num_hidden_layers * seq * width
        return batch * (seq * body + (predicted or seq) * 6 * head)
    # Encoder-decoder: the encoder sees the inputs, the decoder and output layer the targets; the decoder attends
    # to itself and to the inputs.
    output = 0 if "lm_head" in params else vocab * width
    # num_hidden_layers is T5's num_layers and BART's encoder_layers; the decoder's count has a name per family.
    decoder_layers = getattr(hf_config, "num_decoder_layers", None) or hf_config.decoder_layers
    encoder = 6 * matrix_params(params, "encoder") + 12 * hf_config.num_hidden_layers * seq * width
    decoder = (6 * (matrix_params(params, "decoder") + matrix_params(params, "lm_head") + output)
               + 12 * decoder_layers * (target + seq) * width)
    return batch * (seq * encoder + target * decoder)


class TrainSetup(NamedTuple):
    hf_config: object
    family: object
    model: object
    script: object  # the run_*.py module whose train_step this is
    mesh: object
    layout: parallel.StateLayout
    step: object  # the script's train_step jitted for the state's shardings (layout.train_step)


def train_setup(config: str, dtype=jnp.float32, gradient_checkpointing: bool = False, fsdp: int = 1,
                tensor_parallel: int = 1, mesh=None) -> TrainSetup:
    """The model of CONFIGS[config], its train state's layout on the mesh (float32 AdamW) and its script's real
    train step jitted with the state's shardings, as the scripts build them (bench_sft_step.py uses it too).
    mesh: None, parallel.make_mesh's over the devices at hand; or one given (`topology_mesh`)."""
    spec = CONFIGS[config]
    hf_config = AutoConfig.for_model(spec["type"], **spec["model"])
    head, script = TASKS[spec["type"]]
    family, model = models.create(hf_config, head, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
    tx = training.make_optimizer(1e-4, weight_decay=0.01)
    mesh = mesh or parallel.make_mesh(fsdp, tensor_parallel)
    layout = parallel.StateLayout(model, family.init_params, tx, mesh, parallel.RULES)
    step = layout.train_step(functools.partial(script.train_step, accumulation_steps=1,
                                               **STEP_OPTIONS.get(script, {})))
    return TrainSetup(hf_config, family, model, script, mesh, layout, step)


# The TPU pods --compile_topology compiles for: jax.experimental.topologies' description of their devices.
TOPOLOGIES = {"v5e-256": dict(topology_name="v5e:16x16", chips_per_host_bounds=(2, 2, 1))}


def topology_mesh(name: str, fsdp: int, tensor_parallel: int):
    """The (data, fsdp, tensor) mesh over the devices of TOPOLOGIES[name], for an ahead-of-time compile by libtpu on
    this machine (MaxText's train_compile.py way); nothing runs on them."""
    from jax.experimental import mesh_utils, topologies
    from jax.sharding import AxisType, Mesh
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise SystemExit(f"--compile_topology {name}: libtpu is not importable (pip install libtpu==<the version jax "
                         "pins> into a folder on PYTHONPATH; see benchmarks/README.md)") from None
    devices = topologies.get_topology_desc(platform="tpu", chip_config_name="default", num_slices=1,
                                           wrap=(False, False, False), **TOPOLOGIES[name]).devices
    shape = parallel.mesh_shape(len(devices), fsdp, tensor_parallel)
    grid = mesh_utils.create_device_mesh([shape[axis] for axis in parallel.AXES], devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, parallel.AXES, axis_types=(AxisType.Auto,) * len(parallel.AXES))


def synthetic_batch(script, vocab_size: int, batch: int, seq: int, target: int, rng) -> dict:
    ids = rng.integers(5, vocab_size, (batch, seq)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    if script is run_mlm_flax:  # the script's own 15% masking
        tokenizer = types.SimpleNamespace(vocab_size=vocab_size, mask_token_id=4, pad_token_id=1)
        return run_mlm_flax.mask_tokens({"input_ids": ids, "special_tokens_mask": np.zeros_like(ids)},
                                        example_rng.keys(0, np.arange(batch)), tokenizer, 0.15,
                                        run_mlm_flax.max_predictions(seq, 0.15))
    if script in (run_t5_mlm_flax, run_summarization_flax):
        labels = rng.integers(5, vocab_size, (batch, target)).astype(np.int32)
        return {"input_ids": ids, "attention_mask": ones, "labels": labels, "decoder_input_ids": labels,
                "weights": np.ones((batch, target), np.float32)}
    return run_clm_flax.to_batch(ids)


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


def state_bytes_per_device(abstract_state) -> int:
    """Bytes of one device's shards of the train state (the largest over devices)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bert-small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    parser.add_argument("--batch", type=int, help="global batch (default: the config's)")
    parser.add_argument("--seq", type=int, help="sequence length (default: the config's)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fsdp", type=int, default=1, help="devices the state is split over (-1: all)")
    parser.add_argument("--tensor_parallel", type=int, default=1)
    parser.add_argument("--compile_only", action="store_true", help="plan memory: compile, allocate nothing")
    parser.add_argument("--compile_topology", choices=sorted(TOPOLOGIES),
                        help="plan memory for this TPU pod with libtpu's compiler (implies --compile_only)")
    args = parser.parse_args(argv)
    mesh = None
    if args.compile_topology:
        args.compile_only = True
        mesh = topology_mesh(args.compile_topology, args.fsdp, args.tensor_parallel)

    spec = CONFIGS[args.config]
    seq, target, batch = args.seq or spec["seq"], spec.get("target", 0), args.batch or spec["batch"]
    dtype = jnp.dtype(args.dtype)
    hf_config, family, model, script, mesh, layout, step = train_setup(
        args.config, dtype, args.gradient_checkpointing, args.fsdp, args.tensor_parallel, mesh)
    host = synthetic_batch(script, hf_config.vocab_size, batch, seq, target, np.random.default_rng(0))
    abstract_state = layout.abstract_state()
    params = jax.eval_shape(functools.partial(family.init_params, model), jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    result = {"config": args.config, "dtype": args.dtype, "devices": f"{mesh.devices.size} x "
              f"{mesh.devices.flat[0].device_kind}", "mesh": dict(mesh.shape), "params_M": round(n_params / 1e6, 2),
              "global_batch": batch, "seq": seq, **({"target": target} if target else {}),
              "gradient_checkpointing": args.gradient_checkpointing,
              "state_GiB_per_device": round(state_bytes_per_device(abstract_state) / 2**30, 3)}

    if args.compile_only:
        batch_sharding = parallel.batch_sharding(mesh)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in host.items()}
        start = time.perf_counter()
        compiled = step.lower(abstract_state, abstract_batch, jax.random.key(1)).compile()
        memory = compiled.memory_analysis()
        result.update(compile_s=round(time.perf_counter() - start, 1),
                      **{f"{name}_GiB": round(getattr(memory, f"{name}_size_in_bytes") / 2**30, 3)
                         for name in ("argument", "temp", "output")})
        print(json.dumps(result))
        return result

    predicted = host["positions"].shape[1] if "positions" in host else 0
    flops_per_step = model_flops_per_step(params, hf_config, batch, seq, target, predicted)
    state = layout.create(layout.init(jax.random.key(0)))
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

    tokens_per_s = batch * (seq + target) / step_s  # encoder and decoder tokens for T5 and BART
    peak = peak_matmul_flops(dtype) * jax.device_count()
    memory, memory_kind = peak_memory_bytes()
    result.update({
        "first_step_s": round(compile_s, 2), "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(flops_per_step / step_s / 1e12, 4),
        "peak_matmul_tflops_per_s": round(peak / 1e12, 4),
        "mfu": round(flops_per_step / step_s / peak, 4),
        "peak_memory_GiB": round(memory / 2 ** 30, 3), "memory_kind": memory_kind,
    })
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

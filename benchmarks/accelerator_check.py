#!/usr/bin/env python
"""Is this accelerator doing its job? Times the bfloat16 train step of bert-base (run_mlm_flax.py), gpt2-small and
llama-1b (run_clm_flax.py) with the fastest attention JAX offers here, and prints one line per config with tokens/s
and MFU against the chip's published peak. benchmarks/accelerator_check.sh runs it.

    python benchmarks/accelerator_check.py [--steps 20] [--attention auto|xla|cudnn|splash|chunked]
                                           [--configs bert-base ...]

Attention, by platform (flaxtrain/models/attention.py selects it):
  NVIDIA GPU  cuDNN's flash attention (jax.nn.dot_product_attention, implementation="cudnn"); a config whose
              attention cuDNN refuses runs XLA's and its line says why; one whose cuDNN step fails to compile or
              run is run again with XLA's.
  TPU         the Pallas splash attention kernel (flaxtrain/models/splash.py: causal for gpt2-small and
              llama-1b, padding segments for bert-base), with the same fallbacks as cuDNN's.
  CPU         XLA's attention, said in the output, on the configs shrunk to 2 layers of width 128 and 64 tokens,
              so that CI runs this script in a minute and keeps it from rotting.
Attention dropout is 0 in every config (bert-base and gpt2-small default to 0.1): dropping attention probabilities
takes the explicit softmax, which no fused kernel runs. Hidden dropout stays as configured.

MFU: bench_train_step.model_flops_per_step (6 FLOPs per parameter per token plus attention, not counting
llama-1b's recomputation under gradient checkpointing) over the published dense bfloat16 peak of the device kind
(PEAK_TFLOPS) times the devices; for a kind not in the table, over the measured matmul peak, and the output says so.
"""

import argparse
import functools
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_train_step as bench  # puts the repository root on sys.path
from flaxtrain import parallel  # noqa: E402
from flaxtrain.models import attention  # noqa: E402

CONFIGS = ("bert-base", "gpt2-small", "llama-1b")
# Shapes on an accelerator: 16,384 tokens a step each, long enough rows that attention's kernel matters. llama-1b
# recomputes its layers (its 13.8 GiB of float32 AdamW state and a step's activations then fit an 80 GB GPU) and
# splits its state over every device (fsdp -1: a TPU chip of 16 GiB cannot hold it whole).
SHAPES = {"bert-base": dict(batch=32, seq=512), "gpt2-small": dict(batch=16, seq=1024),
          "llama-1b": dict(batch=8, seq=2048, gradient_checkpointing=True, fsdp=-1)}
# On a CPU: the same architectures at a size a 2-core machine trains in seconds.
TINY_SHAPE = dict(batch=4, seq=64)
TINY = {
    "bert-base": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256),
    "gpt2-small": dict(vocab_size=1024, n_embd=128, n_layer=2, n_head=4, bos_token_id=1023, eos_token_id=1023),
    "llama-1b": dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=256),
}
ATTENTION_DROPOUT = {"bert": "attention_probs_dropout_prob", "gpt2": "attn_pdrop", "llama": "attention_dropout"}
# Published dense bfloat16 TFLOP/s of one chip, by jax's device_kind (first match). PCIe H100s and H200 NVL run at
# lower clocks than the SXM parts and are left to the measured peak, as is any kind not listed.
PEAK_TFLOPS = [
    (r"H100(?!.*(PCIe|NVL))", 989.0, "H100 SXM"),
    (r"H200(?!.*NVL)", 989.0, "H200"),
    (r"A100", 312.0, "A100"),
    (r"^TPU v4$", 275.0, "TPU v4"),
    (r"^TPU v5 ?(lite|e)$", 197.0, "TPU v5e"),
    (r"^TPU v5p?$", 459.0, "TPU v5p"),
    (r"^TPU v6 ?(lite|e)$", 918.0, "TPU v6e"),
]


def published_peak(device_kind: str) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s of one chip, its name) for a device_kind of PEAK_TFLOPS, else (None, "")."""
    for pattern, tflops, name in PEAK_TFLOPS:
        if re.search(pattern, device_kind):
            return tflops * 1e12, name
    return None, ""


def choose_attention(platform: str, requested: str) -> tuple[str, str]:
    """(the implementation to select, what the output says about it) for --attention on this platform."""
    if requested != "auto":
        return requested, f"{requested}, as --attention asked"
    if platform == "gpu":
        return "cudnn", "cudnn (cuDNN flash attention through jax.nn.dot_product_attention)"
    if platform == "tpu":
        return "splash", "splash (the Pallas splash attention kernel, flaxtrain/models/splash.py)"
    return "xla", f"xla: fallback, no GPU or TPU here ({platform}), JAX's default XLA attention"


def register(name: str, tiny: bool) -> str:
    """Adds CONFIGS[name] as this check trains it to bench_train_step.CONFIGS, whose name train_setup takes:
    attention dropout 0, and the tiny sizes if asked. Returns that name."""
    spec = bench.CONFIGS[name]
    model = {**spec["model"], ATTENTION_DROPOUT[spec["type"]]: 0.0, **(TINY[name] if tiny else {})}
    key = f"{name}, accelerator check{', tiny' if tiny else ''}"
    bench.CONFIGS[key] = {**spec, "model": model}
    return key


def time_train_step(config: str, batch: int, seq: int, steps: int, gradient_checkpointing: bool = False,
                    fsdp: int = 1) -> dict:
    """The script's real bfloat16 train step on a synthetic batch [batch, seq]: first-step (compile) and steady
    seconds, tokens/s, model FLOPs a step and the loss of the last step."""
    setup = bench.train_setup(config, jnp.bfloat16, gradient_checkpointing, fsdp)
    host = bench.synthetic_batch(setup.script, setup.hf_config.vocab_size, batch, seq, 0, np.random.default_rng(0))
    params = jax.eval_shape(functools.partial(setup.family.init_params, setup.model), jax.random.key(0))
    predicted = host["positions"].shape[1] if "positions" in host else 0  # the masked-LM head's positions
    flops = bench.model_flops_per_step(params, setup.hf_config, batch, seq, 0, predicted)
    state = setup.layout.create(setup.layout.init(jax.random.key(0)))
    device_batch = parallel.to_global(host, setup.mesh, batch)
    rng = jax.random.key(1)

    start = time.perf_counter()
    state, metrics = setup.step(state, device_batch, rng)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = setup.step(state, device_batch, rng)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    return dict(first_step_s=first_step_s, step_s=step_s, tokens_per_s=batch * seq / step_s, flops=flops,
                loss=float(metrics["loss_sum"] / metrics["weight"]),
                params_M=sum(x.size for x in jax.tree.leaves(params)) / 1e6)


def check(name: str, implementation: str, tiny: bool, steps: int, devices: int) -> dict:
    """One config's run with `implementation` selected; raises what the run raises, a non-finite loss included."""
    shape = TINY_SHAPE if tiny else SHAPES[name]
    batch = math.ceil(shape["batch"] / devices) * devices  # every device gets rows
    attention.select_implementation(implementation)
    attention.fallbacks.clear()  # why this config's trace ran XLA's attention, if it did
    result = time_train_step(register(name, tiny), batch, shape["seq"], steps,
                             shape.get("gradient_checkpointing", False), shape.get("fsdp", 1))
    if not math.isfinite(result["loss"]):
        raise FloatingPointError(f"the loss is {result['loss']}")
    refused = list(attention.fallbacks)
    return {**result, "batch": batch, "seq": shape["seq"],
            "attention": "xla" if refused else implementation,
            "note": f"{implementation} refused: {'; '.join(refused)}" if refused else ""}


def line(name: str, result: dict, peak: float) -> str:
    mfu = result["flops"] / result["step_s"] / peak
    text = (f"{name}: tokens/s={result['tokens_per_s']:.1f} mfu={mfu:.4f} step_s={result['step_s']:.4f} "
            f"first_step_s={result['first_step_s']:.1f} batch={result['batch']} seq={result['seq']} "
            f"params_M={result['params_M']:.1f} loss={result['loss']:.3f} attention={result['attention']}")
    return text + (f" ({result['note']})" if result["note"] else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="timed steps after the first (default: 20, on a CPU 2)")
    parser.add_argument("--attention", choices=["auto", *attention.IMPLEMENTATIONS], default="auto",
                        help="auto: cudnn on an NVIDIA GPU, splash on a TPU, else xla")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="the CPU's tiny sizes on an accelerator too")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: at least 1")

    device = jax.devices()[0]
    platform, devices = device.platform, jax.device_count()
    tiny = args.tiny or platform == "cpu"
    steps = args.steps or (2 if platform == "cpu" else 20)
    implementation, attention_note = choose_attention(platform, args.attention)
    print(f"accelerator check: {devices} x {device.device_kind} ({platform}), bfloat16 train steps, {steps} timed "
          f"a config, {'tiny sizes (2 layers, width 128, 64 tokens)' if tiny else 'full sizes'}", flush=True)
    print(f"attention: {attention_note}; attention dropout 0 in every config, so that a fused kernel can run",
          flush=True)
    chip_peak, chip = published_peak(device.device_kind)
    if chip_peak:
        print(f"peak: {chip_peak / 1e12:.0f} TFLOP/s a chip, the published dense bf16 peak of {chip}", flush=True)
    else:
        # A CPU's large bf16 matmul takes seconds: measure it on a smaller one.
        chip_peak = bench.peak_matmul_flops(jnp.bfloat16, **(dict(n=1024, repeats=2) if platform == "cpu" else {}))
        caveat = " (on a CPU the MFU means little)" if platform == "cpu" else ""
        print(f"peak: {chip_peak / 1e12:.3g} TFLOP/s a device, measured on a bf16 matmul: no published peak for "
              f"device kind {device.device_kind!r}{caveat}", flush=True)

    failed = []
    for name in args.configs:
        try:
            result = check(name, implementation, tiny, steps, devices)
        except Exception as error:  # noqa: BLE001 (one config's failure is a line of the report, not the end)
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            if implementation not in ("cudnn", "splash"):
                print(f"{name}: failed ({reason})", flush=True)
                failed.append(name)
                continue
            print(f"{name}: failed with {implementation} attention ({reason}); again with xla", flush=True)
            try:
                result = {**check(name, "xla", tiny, steps, devices), "note": f"{implementation} failed: {reason}"}
            except Exception as error:  # noqa: BLE001
                print(f"{name}: failed ({type(error).__name__}: {error})", flush=True)
                failed.append(name)
                continue
        print(line(name, result, chip_peak * devices), flush=True)
    attention.select_implementation(None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/bench_train_step.py --compile_only: the memory plan of a 7B model on simulated devices, allocating
nothing. With --fsdp over every device, each device holds 1/N of the parameters and their AdamW moments. And what
sequence parallelism and the cast before the gather (flaxtrain/parallel.py) save, on a tiny Llama, loss unchanged;
and what attention in query blocks (flaxtrain/models/attention.py) saves over 2048 tokens, gradients unchanged."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import tiny

LLAMA_7B_PARAMS = 6_738_415_616  # Llama-2-7B's parameter count


@pytest.mark.parametrize("devices", [8, 32])
def test_llama_7b_state_splits_over_every_device(devices):
    # 8 sequences of 2048 tokens on 8 devices; on 32, one sequence a device as well (a batch must split over them).
    done = tiny.run_script("benchmarks/bench_train_step.py", ["--config=llama-7b", "--fsdp=-1", "--compile_only",
                                                              "--gradient_checkpointing", f"--batch={devices}"],
                           devices=devices)
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["mesh"] == {"data": 1, "fsdp": devices, "tensor": 1}
    assert plan["params_M"] * 1e6 == pytest.approx(LLAMA_7B_PARAMS, rel=1e-6)
    # float32 parameters and AdamW's two float32 moments: 12 bytes a parameter, split over every device.
    assert plan["state_GiB_per_device"] == pytest.approx(LLAMA_7B_PARAMS * 12 / devices / 2**30, rel=0.1)
    assert plan["argument_GiB"] == pytest.approx(plan["state_GiB_per_device"], rel=0.1)  # what the step is given
    assert 0 < plan["temp_GiB"] < 8  # one layer's gathered weights, the gradients' shards, one sequence's activations


# A small Llama on fsdp 4 x tensor 2 (8 simulated devices), its train step planned and its loss evaluated as the
# code builds them, then again with the residual stream kept whole along the positions (parallel.split_batch
# between layers, as before sequence parallelism) and the matrices cast where the layers use them (not before
# the gather). Prints {"now": [temp bytes, loss], "before": [...]}.
BEFORE_AND_NOW = """
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
from transformers import AutoConfig
import run_clm_flax
from flaxtrain import models, parallel, training
from flaxtrain.models import stack

# Many layers of a wide residual stream: the layers' saved inputs are most of the temporaries, as in a large model.
config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=16,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
family, model = models.create(config, "CausalLM", dtype=jnp.dtype(sys.argv[1]), gradient_checkpointing=True)
mesh = parallel.make_mesh(fsdp=4, tensor_parallel=2)
layout = parallel.StateLayout(model, family.init_params, training.make_optimizer(1e-3), mesh, parallel.RULES)
state = layout.create(layout.init(jax.random.key(0)))
ids = np.random.default_rng(0).integers(5, 256, (16, 256)).astype(np.int32)
batch = parallel.to_global(run_clm_flax.to_batch(ids), mesh, 16)

def plan_and_loss():
    train = layout.train_step(functools.partial(run_clm_flax.train_step, accumulation_steps=1))
    temp = train.lower(state, batch, jax.random.key(1)).compile().memory_analysis().temp_size_in_bytes
    sums = layout.eval_step(run_clm_flax.eval_step)(state, batch)
    return temp, float(sums["loss"] / sums["weight"])

out = {"now": plan_and_loss()}
stack.split_residual = parallel.split_batch
parallel.in_compute_dtype = lambda params, dtype, shardings: params
out["before"] = plan_and_loss()
print(json.dumps(out))
"""


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_sequence_parallel_shrinks_temporaries_and_keeps_the_loss(dtype, tolerance):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # XLA's optimising passes on (the suite turns most off): the plan is of the step as it runs.
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", BEFORE_AND_NOW, dtype], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (temp_now, loss_now), (temp_before, loss_before) = out["now"], out["before"]
    assert loss_now == pytest.approx(loss_before, rel=tolerance)
    assert loss_now == pytest.approx(np.log(256), rel=0.05)  # an untrained model: about uniform over the vocabulary
    # Each layer's saved input is split over the 2 tensor devices along the positions.
    assert temp_now < 0.8 * temp_before, (temp_now, temp_before)


# The forward and backward of one attention over 2048 tokens (8 heads, grouped 2 to a key/value head) under
# jax.checkpoint, as a rematerialised layer runs it: XLA's temporaries and the gradient of q, with attention()'s
# query blocks (models/attention.py, FLAXTRAIN_ATTENTION=chunked) and with one call. Prints {"blocks": [bytes,
# gradient], "one_call": [...]}.
ATTENTION_PLAN = """
import json
import jax, jax.numpy as jnp, numpy as np
from flaxtrain.models import attention as attention_module

rng = np.random.default_rng(0)
q = jnp.asarray(rng.normal(size=(1, 2048, 8, 32)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(1, 2048, 4, 32)), jnp.float32) for _ in range(2))
mask = attention_module.causal_mask(jnp.ones((1, 2048), jnp.int32))[0]

def plan():
    loss = jax.checkpoint(lambda q, k, v: (attention_module.attention(q, k, v, mask) ** 2).sum())
    step = jax.jit(jax.grad(loss, (0, 1, 2)))
    temp = step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    return temp, np.asarray(step(q, k, v)[0]).tolist()

attention_module.select_implementation("chunked")
out = {"blocks": plan()}
attention_module.select_implementation(None)
out["one_call"] = plan()
print(json.dumps(out))
"""


def test_attention_in_query_blocks_keeps_one_block_of_scores():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-c", ATTENTION_PLAN], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (temp_blocks, grad_blocks), (temp_one, grad_one) = out["blocks"], out["one_call"]
    np.testing.assert_allclose(grad_blocks, grad_one, atol=1e-4)
    scores = 8 * 2048 * 2048 * 4  # float32 [heads, T, S] of the row: 128 MiB
    assert temp_one > scores, temp_one  # one call keeps at least the whole row's scores
    assert temp_blocks < 0.5 * temp_one, (temp_blocks, temp_one)  # 512 of the 2048 queries at a time

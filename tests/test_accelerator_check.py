"""benchmarks/accelerator_check.sh on the CPU, as CI runs it to keep it from rotting, and the choice of attention
kernel it relies on (flaxtrain/models/attention.py: FLAXTRAIN_ATTENTION, select_implementation, the fallback from
cuDNN). The GPU path itself cannot run here: its refusals are checked against jax's own rules instead."""

import importlib
import logging
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtrain.models import attention as attention_module
from flaxtrain.models.attention import attention, cudnn_refusal, select_implementation
from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(?P<config>[\w-]+): tokens/s=(?P<tokens>[\d.]+) mfu=(?P<mfu>[\d.]+) .* "
                  r"attention=(?P<attention>\w+)( \((?P<note>.*)\))?$")


@pytest.fixture(autouse=True)
def default_attention():
    yield
    select_implementation(None)
    attention_module.fallbacks.clear()


def test_cpu_run_names_its_attention_and_the_fallback():
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "accelerator_check.sh"), "--steps", "1"],
                          env=tiny.script_env(1, {"PYTHON": sys.executable}), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert "attention: xla: fallback, no GPU or TPU here (cpu)" in out[1]
    assert "attention dropout 0" in out[1]
    assert out[2].startswith("peak:") and "measured" in out[2]
    results = [LINE.match(text) for text in out[3:]]
    assert all(results), out[3:]
    assert [r["config"] for r in results] == ["bert-base", "gpt2-small", "llama-1b"]
    for r in results:
        assert float(r["tokens"]) > 0 and float(r["mfu"]) > 0
        assert r["attention"] == "xla" and r["note"] is None


def heads(dtype, kv_heads=4, head_size=8, length=6):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.normal(size=(2, length, heads, head_size)), dtype) for heads in (4, kv_heads, kv_heads)]


# (key/value heads, mask, bias): BERT's padded keys [B, 1, 1, S]; a decoder's causal mask with grouped heads; T5's
# per-head bias with a mask.
CASES = {
    "padding": (4, jnp.arange(6)[None, None, None, :] < jnp.array([6, 3])[:, None, None, None], None),
    "causal": (2, jnp.tril(jnp.ones((6, 6), bool))[None, None], None),
    "bias": (4, jnp.ones((1, 1, 6, 6), bool).at[..., -2:].set(False),
             jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 6, 6)), jnp.float32)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_each_choice_off_a_gpu_computes_what_the_default_does(case, dtype, caplog):
    """Nothing selected is the call attention() always made; "xla" names the same kernel; "cudnn" off a GPU falls
    back to it, bit for bit, and says why once."""
    kv_heads, mask, bias = CASES[case]
    q, k, v = heads(dtype, kv_heads)
    plain = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
    attend = jax.jit(lambda q, k, v, mask: attention(q, k, v, mask, bias=bias))
    plain_jitted = jax.jit(lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask))(
        q, k, v, mask)
    np.testing.assert_array_equal(attention(q, k, v, mask, bias=bias), plain)
    select_implementation("xla")
    np.testing.assert_array_equal(attention(q, k, v, mask, bias=bias), plain)
    select_implementation("cudnn")
    with caplog.at_level(logging.WARNING, logger=attention_module.__name__):
        np.testing.assert_array_equal(attention(q, k, v, mask, bias=bias), plain)
        np.testing.assert_array_equal(attend(q, k, v, mask), plain_jitted)
    assert attention_module.fallbacks == ["no NVIDIA GPU (the backend is cpu)"]
    assert [r.getMessage() for r in caplog.records] == [
        "FLAXTRAIN_ATTENTION=cudnn: XLA's attention instead, no NVIDIA GPU (the backend is cpu)"]


class Attend(nn.Module):
    @nn.compact
    def __call__(self, q, k, v):
        return attention(q, k, v, dropout_rate=0.5, deterministic=False)


def test_attention_dropout_takes_the_explicit_softmax_whatever_is_selected():
    q, k, v = heads(jnp.float32)
    rngs = {"dropout": jax.random.key(0, impl="rbg")}
    expected = Attend().apply({}, q, k, v, rngs=rngs)
    select_implementation("cudnn")
    np.testing.assert_array_equal(Attend().apply({}, q, k, v, rngs=rngs), expected)
    select_implementation("splash")
    np.testing.assert_array_equal(Attend().apply({}, q, k, v, rngs=rngs), expected)
    assert attention_module.fallbacks == [  # said once for both
        "attention dropout (0.5) needs the explicit softmax, which no fused kernel runs"]


def test_a_bad_choice_is_refused_naming_the_variable(monkeypatch):
    with pytest.raises(ValueError, match=r"FLAXTRAIN_ATTENTION=flash: expected one of xla, cudnn"):
        select_implementation("flash")
    monkeypatch.setattr(attention_module, "_implementation", "pallas")  # as read from the environment
    q, k, v = heads(jnp.float32)
    with pytest.raises(ValueError, match=r"FLAXTRAIN_ATTENTION=pallas"):
        attention(q, k, v)


def test_the_environment_selects_for_the_process():
    code = "from flaxtrain.models import attention as a; print(a.selected_implementation())"
    done = subprocess.run([sys.executable, "-c", code], env=tiny.script_env(1, {"FLAXTRAIN_ATTENTION": "cudnn"}),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.strip() == "cudnn", done.stderr[-2000:]


def test_cudnn_refusals_follow_jax_rules(monkeypatch):
    """cudnn_refusal refuses what jax's own checks for implementation="cudnn" refuse while training (off a GPU jax
    takes the pre-Hopper limits, and so does cudnn_refusal), for the arguments _cudnn_attention hands it."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")

    def jax_refuses(q, k, v, mask):
        try:
            bias = None if mask is None else fused.combine_bias_and_mask(None, jnp.broadcast_to(
                mask, (*mask.shape[:-2], q.shape[1], k.shape[1])), q.dtype)
            fused.check_layout(q, k, v, bias, None, None, None, None, None, None, fused.AttentionLayout.BTNH)
            fused.check_is_flash_attention(q, k, v, fused.AttentionLayout.BTNH.value, 90000, bias is not None, True)
        except (NotImplementedError, ValueError):
            return True
        return False

    checked = 0
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        for head_size in (8, 12, 64, 128, 136):
            for length in (6, 7):
                for mask in (None, jnp.ones((2, 1, 1, length), bool)):
                    q, k, v = heads(dtype, head_size=head_size, length=length)
                    assert (cudnn_refusal(q, k, v, mask) is not None) == jax_refuses(q, k, v, mask), (
                        dtype, head_size, length, mask is not None)
                    checked += 1
    assert checked > 50


def test_published_peaks_by_device_kind():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        check = importlib.import_module("accelerator_check")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    kinds = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": None, "NVIDIA H200": 989, "NVIDIA A100-SXM4-40GB": 312,
             "TPU v4": 275, "TPU v5 lite": 197, "TPU v5": 459, "TPU v5p": 459, "TPU v6 lite": 918, "cpu": None}
    for kind, tflops in kinds.items():
        peak, _ = check.published_peak(kind)
        assert (peak and peak / 1e12) == tflops, kind

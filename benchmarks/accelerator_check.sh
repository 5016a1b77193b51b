#!/usr/bin/env bash
# The bfloat16 train step of bert-base, gpt2-small and llama-1b with the fastest attention JAX offers on this
# machine (cuDNN flash attention on an NVIDIA GPU, Pallas splash attention on a TPU, XLA's with tiny sizes on a
# CPU), one line per config with tokens/s and MFU against the chip's published peak:
# benchmarks/accelerator_check.py. Stopped at 8 minutes (expected: a few minutes on one H100, mostly compiling; not
# yet measured on one). On a CPU, tiny sizes, XLA's attention (it says so): a minute or two;
# tests/test_accelerator_check.py runs it so.
#
#   benchmarks/accelerator_check.sh [--steps N] [--attention auto|xla|cudnn|splash|chunked]
#                                   [--configs bert-base ...] [--tiny]
#
# PYTHON picks the interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
status=0
timeout 480 "$PYTHON" benchmarks/accelerator_check.py "$@" || status=$?
if [[ $status -eq 124 ]]; then
  echo "accelerator check: stopped after 8 minutes (the configs above finished; the rest did not)" >&2
fi
exit $status

"""benchmarks/bench_train_step.py --compile_only: the memory plan of a 7B model on simulated devices, allocating
nothing. With --fsdp over every device, each device holds 1/N of the parameters and their AdamW moments."""

import json

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

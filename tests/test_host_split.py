"""Input at pod scale: each host builds, masks and corrupts only its own rows, and an example's random mask is a
function of its key, so the same training on 8 devices as 1 host, 2 hosts or 4 hosts (real multi-host jobs over
127.0.0.1) gives the same losses, evaluation and weights, for the masked-LM, T5 and causal-LM scripts."""

import pytest

from tests import tiny

# Few steps and small batches: 8 simulated devices on a loaded 2-core machine are slow, and XLA's collectives time
# out after 40 s. The evaluation set (20 lines) does not fill its last batch of 24: padding rows on some hosts.
COMMON = ["--max_steps=6", "--logging_steps=2", "--eval_steps=3", "--save_steps=6", "--learning_rate=3e-3",
          "--warmup_steps=2", "--per_device_train_batch_size=2", "--per_device_eval_batch_size=3"]
LENGTH = {"mlm": ["--max_seq_length=32"], "t5": ["--max_seq_length=32"], "clm": ["--block_size=32"]}
SCRIPTS = {"mlm": "run_mlm_flax.py", "t5": "run_t5_mlm_flax.py", "clm": "run_clm_flax.py"}
# (processes, devices per process, extra flags): the runs that must equal 1 process x 8 devices.
SPLITS = {"2x4": (2, 4, []), "4x2": (4, 2, [])}
# No compilation cache on several processes: on the CPU JAX keys a program's entry by process, and only process 0
# writes, so process 0 alone would find its steps compiled, then wait in the first collective while the others
# compile; Gloo gives up after 30 s, which a loaded 2-core machine can take.
NO_CACHE = ["--compilation_cache_dir=none"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("hosts")
    train = tiny.write_corpus(work / "train.txt")
    valid = tiny.write_corpus(work / "valid.txt", lines=20, seed=1)
    models = {"mlm": tiny.make_roberta(work / "roberta", train), "t5": tiny.make_t5(work / "t5", train),
              # Llama, not GPT-2: GPT-2's fused c_attn bias holds key biases, whose updates are rounding noise
              # (see tiny.NO_GRADIENT) that no two summation orders share.
              "clm": tiny.make_decoder(work / "llama", train, "llama")}
    return {task: [f"--train_file={train}", f"--validation_file={valid}", f"--config_name={model}",
                   f"--tokenizer_name={model}", *LENGTH[task], *COMMON] for task, model in models.items()}


def assert_same_evaluation(output_dir, expected_dir):
    results, expected = (tiny.read_json(d / "eval_results.json") for d in (output_dir, expected_dir))
    assert results["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-4)
    assert results["eval_accuracy"] == pytest.approx(expected["eval_accuracy"], abs=1e-6)


@pytest.mark.parametrize("task", ["mlm", "t5", "clm"])
def test_one_two_and_four_hosts_train_the_same_model(setup, tmp_path, task):
    splits = dict(SPLITS)
    if task == "mlm":  # rows follow the mesh: both tensor-parallel halves of a replica get the same rows
        splits["2x4_tp2"] = (2, 4, ["--tensor_parallel=2"])
    one_host = tmp_path / "1x8"
    tiny.run_script(SCRIPTS[task], [f"--output_dir={one_host}", *setup[task]], devices=8)
    for name, (processes, devices, flags) in splits.items():
        out = tmp_path / name
        tiny.run_script(SCRIPTS[task], [f"--output_dir={out}", *setup[task], *flags, *NO_CACHE], devices=devices,
                        processes=processes)
        assert [step for step, _, _ in tiny.loss_curve(out)] == [2, 4, 6]
        tiny.assert_same_training(out, one_host)
        assert_same_evaluation(out, one_host)

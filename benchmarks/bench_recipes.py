"""Whole recipes, as a user runs them, with the phase breakdown of each run: where the wall time went.

Runs this project's scripts from the repository root, one after another (never two at once), on the local data and
models that ../shared/bench/original/make_assets.py makes (the same ones ../shared/bench/e2e_recipes.sh gives the
original scripts, with the same flags), and prints one JSON line per run: the wall seconds, the seconds outside
the job (interpreter start, imports, exit), each phase of flaxtrain/phases.py with its compile seconds, and the
task metric.

    python benchmarks/bench_recipes.py --assets ASSETS [--recipes glue summ summ_beam4 mlm clm] [--rounds 2]
        [--cache cold|warm]

--cache cold (the default) gives every run an empty compilation cache, as a user's first run has; warm runs each
recipe once untimed first, so that the timed runs read their compiled steps from the cache, as a rerun does.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flaxtrain.phases import PREFIX  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_flags(recipe: str, a: str) -> tuple[str, list[str], str]:
    """(script, flags, metric key in all_results.json) of a recipe on the assets `a`: e2e_recipes.sh's flags."""
    if recipe == "glue":
        return "run_flax_glue.py", [
            f"--model_name_or_path={a}/models/tiny-bert-cls", f"--train_file={a}/data/glue_train.csv",
            f"--validation_file={a}/data/glue_validation.csv", "--max_seq_length=128", "--learning_rate=1e-3",
            "--num_train_epochs=2", "--per_device_train_batch_size=32", "--per_device_eval_batch_size=64",
            "--eval_steps=100000", "--save_steps=100000", "--logging_steps=50", "--seed=42", "--do_train",
            "--do_eval"], "eval_accuracy"
    if recipe in ("summ", "summ_beam4"):
        return "run_summarization_flax.py", [
            f"--model_name_or_path={a}/models/tiny-bart", f"--train_file={a}/data/summ_train.json",
            f"--validation_file={a}/data/summ_validation.json", f"--test_file={a}/data/summ_validation.json",
            "--text_column=text", "--summary_column=summary", "--do_train", "--do_eval", "--do_predict",
            "--predict_with_generate", "--max_source_length=256", "--max_target_length=64",
            f"--num_beams={4 if recipe == 'summ_beam4' else 1}", "--num_train_epochs=2", "--learning_rate=1e-3",
            "--warmup_steps=0", "--per_device_train_batch_size=16", "--per_device_eval_batch_size=32",
            "--seed=42"], "eval_rougeLsum"
    if recipe in ("mlm", "clm"):
        model = "tiny-bert-mlm" if recipe == "mlm" else "tiny-gpt2"
        length = "--max_seq_length=128" if recipe == "mlm" else "--block_size=128"
        return f"run_{recipe}_flax.py", [
            f"--model_name_or_path={a}/models/{model}", f"--train_file={a}/data/lm_train.txt",
            f"--validation_file={a}/data/lm_validation.txt", length, "--num_train_epochs=5",
            "--per_device_train_batch_size=8", "--per_device_eval_batch_size=16", "--learning_rate=1e-3",
            "--warmup_steps=0", "--logging_steps=10", "--eval_steps=100000", "--save_steps=100000", "--seed=42",
            "--do_train", "--do_eval"], "eval_loss"
    raise ValueError(f"unknown recipe {recipe!r}")


def run_once(recipe: str, assets: str, out: str, cache: str, python: str) -> dict:
    script, flags, metric = recipe_flags(recipe, assets)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu"}
    command = [python, script, f"--output_dir={out}", "--overwrite_output_dir", "--resume_from_checkpoint=none",
               f"--compilation_cache_dir={cache}", *flags]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{recipe}: exit {done.returncode}\n{done.stderr[-3000:]}")
    line = next(line for line in done.stderr.splitlines()[::-1] if PREFIX in line)
    phases = json.loads(line.split(PREFIX, 1)[1])
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    return {"recipe": recipe, "wall_s": round(wall, 2), "outside_job_s": round(wall - phases["total"], 2),
            "phases_s": phases, metric: results.get(metric)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True, help="the folder make_assets.py wrote (data/, models/)")
    parser.add_argument("--recipes", nargs="+", default=["glue", "summ", "summ_beam4", "mlm", "clm"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold")
    args = parser.parse_args(argv)
    assets = os.path.abspath(args.assets)
    with tempfile.TemporaryDirectory() as work:
        warm_cache = os.path.join(work, "cache")
        if args.cache == "warm":
            for recipe in args.recipes:
                run_once(recipe, assets, os.path.join(work, f"{recipe}-warmup"), warm_cache, sys.executable)
        for r in range(args.rounds):
            for recipe in args.recipes:
                cache = warm_cache if args.cache == "warm" else os.path.join(work, f"cache-{recipe}-{r}")
                print(json.dumps({"round": r + 1, "cache": args.cache, **run_once(
                    recipe, assets, os.path.join(work, f"{recipe}-{r}"), cache, sys.executable)}), flush=True)


if __name__ == "__main__":
    main()

"""Whole recipes, as a user runs them, with the phase breakdown of each run: where the wall time went; beside the
original Hugging Face Flax scripts when they are at hand.

Runs this project's scripts from the repository root, one after another (never two at once), on the local data and
models that ../shared/bench/original/make_assets.py makes, and prints one JSON line per run: the wall seconds, the
seconds outside the job (interpreter start, imports, exit), each phase of flaxtrain/phases.py with its compile
seconds, and the task metrics (glue: eval_accuracy; summ, summ_beam4: test ROUGE-1/2/L/Lsum and gen_len; mlm:
eval_accuracy; clm: eval_perplexity).

    python benchmarks/bench_recipes.py --assets ASSETS [--recipes glue summ summ_beam4 mlm clm] [--rounds 2]
        [--cache cold|warm] [--original_scripts DIR --original_python PY]

With --original_scripts (the original scripts and their metrics/ folder, see ../shared/bench/original/README.md)
each recipe runs the original first, then ours, on the same data, models and flags (those of
../shared/bench/e2e_recipes.sh for glue and summ), and a line gives the ratio of their wall times.

--cache cold (the default) gives every run of ours an empty compilation cache, as a user's first run has (the
original has no persistent cache: it compiles on every start); warm runs each recipe once untimed first, so that the
timed runs read their compiled steps from the cache, as a rerun does.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flaxtrain.phases import PREFIX  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu"}


def recipe(name: str, a: str) -> dict:
    """script, flags both sides take, ours_only / original_only flags, and (results file, metric keys...)."""
    if name == "glue":
        return dict(script="run_flax_glue.py", flags=[
            "--model_name_or_path", f"{a}/models/tiny-bert-cls", "--train_file", f"{a}/data/glue_train.csv",
            "--validation_file", f"{a}/data/glue_validation.csv", "--max_seq_length", "128", "--learning_rate", "1e-3",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
            "--eval_steps", "100000", "--save_steps", "100000", "--logging_steps", "50", "--seed", "42"],
            ours_only=["--do_train", "--do_eval"], original_only=[], metric=("eval_results.json", "eval_accuracy"))
    if name in ("summ", "summ_beam4"):
        return dict(script="run_summarization_flax.py", flags=[
            "--model_name_or_path", f"{a}/models/tiny-bart", "--train_file", f"{a}/data/summ_train.json",
            "--validation_file", f"{a}/data/summ_validation.json", "--test_file", f"{a}/data/summ_validation.json",
            "--text_column", "text", "--summary_column", "summary", "--do_train", "--do_eval", "--do_predict",
            "--predict_with_generate", "--max_source_length", "256", "--max_target_length", "64",
            "--num_beams", "4" if name == "summ_beam4" else "1", "--num_train_epochs", "2", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
            "--seed", "42"], ours_only=[], original_only=[],
            metric=("test_results.json", "test_rouge1", "test_rouge2", "test_rougeL", "test_rougeLsum", "test_gen_len"))
    if name in ("mlm", "clm"):
        model, length = ("tiny-bert-mlm", "--max_seq_length") if name == "mlm" else ("tiny-gpt2", "--block_size")
        return dict(script=f"run_{name}_flax.py", flags=[
            "--model_name_or_path", f"{a}/models/{model}", "--train_file", f"{a}/data/lm_train.txt",
            "--validation_file", f"{a}/data/lm_validation.txt", length, "128", "--num_train_epochs", "5",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--logging_steps", "10", "--eval_steps", "100000", "--save_steps", "100000",
            "--seed", "42", "--do_train", "--do_eval"], ours_only=[], original_only=[],
            metric=("eval_results.json", "eval_accuracy" if name == "mlm" else "eval_perplexity"))
    raise ValueError(f"unknown recipe {name!r}")


def timed(command: list[str], cwd: str, env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **OFFLINE, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:2])}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return wall, done.stderr


def metrics_of(out: str, spec: tuple[str, ...]) -> dict:
    """{key: value} of the metric keys spec[1:] in the results file spec[0] (None where absent)."""
    path = os.path.join(out, spec[0])
    results = json.load(open(path)) if os.path.exists(path) else {}
    return {key: results.get(key) for key in spec[1:]}


def ours(name: str, assets: str, out: str, cache: str) -> dict:
    r = recipe(name, assets)
    wall, log = timed([sys.executable, r["script"], "--output_dir", out, "--overwrite_output_dir",
                       "--resume_from_checkpoint=none", f"--compilation_cache_dir={cache}", *r["flags"],
                       *r["ours_only"]], ROOT, {})
    phases = json.loads(next(line for line in log.splitlines()[::-1] if PREFIX in line).split(PREFIX, 1)[1])
    return {"recipe": name, "side": "project", "wall_s": round(wall, 2),
            "outside_job_s": round(wall - phases["total"], 2), "phases_s": phases, **metrics_of(out, r["metric"])}


def original(name: str, assets: str, out: str, scripts: str, python: str) -> dict:
    r = recipe(name, assets)
    os.makedirs(out, exist_ok=True)  # (the original MLM script writes its results into a folder only a save makes)
    wall, _ = timed([python, os.path.join(scripts, r["script"]), "--output_dir", out, "--overwrite_output_dir",
                     *r["flags"], *r["original_only"]], os.path.join(scripts, "metrics"),
                    {"NLTK_DATA": os.path.join(assets, "nltk_data")})
    return {"recipe": name, "side": "original", "wall_s": round(wall, 2), **metrics_of(out, r["metric"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True, help="the folder make_assets.py wrote (data/, models/)")
    parser.add_argument("--recipes", nargs="+", default=["glue", "summ", "summ_beam4", "mlm", "clm"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold")
    parser.add_argument("--original_scripts", help="folder of the original scripts (and metrics/)")
    parser.add_argument("--original_python", help="the original's environment's python")
    args = parser.parse_args(argv)
    if bool(args.original_scripts) != bool(args.original_python):
        parser.error("--original_scripts and --original_python go together")
    assets = os.path.abspath(args.assets)
    with tempfile.TemporaryDirectory() as work:
        warm = os.path.join(work, "cache")
        if args.cache == "warm":
            for name in args.recipes:
                ours(name, assets, os.path.join(work, f"{name}-warmup"), warm)
        for r in range(1, args.rounds + 1):
            for name in args.recipes:
                line = {}
                if args.original_scripts:
                    line = original(name, assets, os.path.join(work, f"{name}-original-{r}"),
                                    os.path.abspath(args.original_scripts), args.original_python)
                    print(json.dumps({"round": r, **line}), flush=True)
                cache = warm if args.cache == "warm" else os.path.join(work, f"cache-{name}-{r}")
                mine = ours(name, assets, os.path.join(work, f"{name}-{r}"), cache)
                print(json.dumps({"round": r, "cache": args.cache, **mine}), flush=True)
                if line:
                    print(json.dumps({"round": r, "recipe": name, "original_over_project":
                                      round(line["wall_s"] / mine["wall_s"], 2)}), flush=True)


if __name__ == "__main__":
    main()

"""The model card (output_dir/README.md) that --push_to_hub uploads: YAML metadata the Hub reads (library, tags,
datasets, base model, metrics as model-index results), then the command, hyperparameters, final metrics and a
summary of the training curve. Secrets never enter it: the flags come through settings.from_flags, which leaves out
args.SECRET_FIELDS.
"""

import json
import os
import re
import sys
from typing import Optional

import jax
import yaml

from flaxtrain import storage

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # a Hub repo id, not a local path
NOT_METRICS = ("_samples", "_runtime", "_steps", "_step", "_per_second")
CURVE_ROWS = 10


def write(output_dir: str, repo_id: str, task: str, flags: dict, changed: dict, script: Optional[str] = None) -> str:
    """Writes output_dir/README.md from the flags and the run's all_results.json and log_history.jsonl."""
    results = _read_json(storage.join(output_dir, "all_results.json")) or {}
    history = _read_history(storage.join(output_dir, "log_history.jsonl"))
    architecture = ((_read_json(storage.join(output_dir, "config.json")) or {}).get("architectures") or [None])[0]
    text = render(repo_id, task, flags, changed, results, history, script=script, architecture=architecture)
    path = storage.join(output_dir, "README.md")
    storage.write_text(path, text)
    return path


def render(repo_id: str, task: str, flags: dict, changed: dict, results: dict, history: list,
           script: Optional[str] = None, architecture: Optional[str] = None) -> str:
    base = flags.get("model_name_or_path")
    dataset = flags.get("dataset_name")
    script = script or _script_name()
    name = repo_id.split("/")[-1]
    metadata = {"library_name": "transformers", "pipeline_tag": task, "tags": [task, "jax", "flax", "flaxtrain"]}
    if dataset:
        metadata["datasets"] = [dataset]
    if base and _is_hub_id(base):
        metadata["base_model"] = base
    metrics = {k: v for k, v in results.items()
               if k.startswith(("eval_", "test_", "predict_")) and isinstance(v, (int, float))
               and not k.endswith(NOT_METRICS)}
    if metrics:
        metadata["model-index"] = [{"name": name, "results": [{
            "task": {"type": task},
            "dataset": {"type": dataset or "custom", "name": dataset or "local files"},
            "metrics": [{"type": k, "value": float(v), "name": k.replace("_", " ").capitalize()}
                        for k, v in sorted(metrics.items())],
        }]}]
    origin = f"fine-tuned from [{base}](https://huggingface.co/{base})" if base and _is_hub_id(base) else (
        f"fine-tuned from `{base}`" if base else "trained from scratch")
    data = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if dataset else "local files"
    parts = [
        "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---",
        f"# {name}",
        f"A {task} model {origin} on {data} with {f'`{script}`' if script else 'flaxtrain'} (JAX/Flax). The weights load in PyTorch with "
        f"`transformers.{architecture or 'AutoModel'}.from_pretrained(\"{repo_id}\")`; the Training metrics tab "
        "shows the TensorBoard logs.",
        "## Results",
        _table(["metric", "value"], [[k, _fmt(v)] for k, v in sorted(results.items())]) if results
        else "No final metrics were written.",
        "## Training curve",
        _curve(history),
        "## Command",
        "```bash\n" + _command(script, changed) + "\n```",
        "## Hyperparameters",
        _hyperparameters(flags),
        "<details><summary>All flags</summary>\n\n```json\n" + json.dumps(flags, indent=2, sort_keys=True)
        + "\n```\n</details>",
    ]
    return "\n\n".join(parts) + "\n"


def _is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not os.path.exists(name)


def _script_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return name if name.startswith("run_") and name.endswith(".py") else ""  # "" when run in process (tests)


def _command(script: str, changed: dict) -> str:
    """The flags that differ from their defaults (settings.changed_flags), as one command line."""
    words = [f"python {script or 'SCRIPT.py'}"]
    words += [f"--{name}" if value is True else f"--{name}={value}" for name, value in changed.items()]
    return " \\\n    ".join(words)


def _hyperparameters(flags: dict) -> str:
    devices = jax.device_count()
    per_device = flags.get("per_device_train_batch_size")
    accumulation = flags.get("gradient_accumulation_steps", 1)
    optimizer = "Adafactor" if flags.get("adafactor") else (
        f"AdamW (betas {flags.get('adam_beta1')}, {flags.get('adam_beta2')}, epsilon {flags.get('adam_epsilon')})")
    rows = [
        ["learning rate", flags.get("learning_rate")],
        ["schedule", f"{flags.get('lr_scheduler_type')}, " + (
            f"{flags['warmup_steps']} warmup steps" if flags.get("warmup_steps") else
            f"warmup ratio {flags['warmup_ratio']}" if flags.get("warmup_ratio") else "no warmup")],
        ["optimizer", optimizer],
        ["weight decay", flags.get("weight_decay")],
        ["batch per device", per_device],
        ["devices", devices],
        ["gradient accumulation", accumulation],
        ["examples per update", per_device * devices * accumulation if per_device else None],
        ["steps" if flags.get("max_steps", -1) > 0 else "epochs",
         flags.get("max_steps") if flags.get("max_steps", -1) > 0 else flags.get("num_train_epochs")],
        ["dtype", flags.get("dtype")],
        ["seed", flags.get("seed")],
    ]
    return _table(["hyperparameter", "value"], [[k, v] for k, v in rows if v is not None])


def _curve(history: list) -> str:
    """Up to CURVE_ROWS logged steps (evenly spread, always the last) with train loss, eval loss and rate."""
    by_step = {}
    for record in history:
        by_step.setdefault(record["step"], {}).update(record)
    steps = sorted(s for s, r in by_step.items() if "train/loss" in r or "eval/loss" in r)
    if not steps:
        return "No training steps were logged."
    if len(steps) > CURVE_ROWS:
        steps = sorted({steps[round(i * (len(steps) - 1) / (CURVE_ROWS - 1))] for i in range(CURVE_ROWS)})
    rows = [[s, _fmt(by_step[s].get("train/epoch")), _fmt(by_step[s].get("train/loss")),
             _fmt(by_step[s].get("eval/loss")), _fmt(by_step[s].get("train/learning_rate"))] for s in steps]
    return _table(["step", "epoch", "train loss", "eval loss", "learning rate"], rows)


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_json(path: str):
    return json.loads(storage.read_text(path)) if storage.isfile(path) else None


def _read_history(path: str) -> list:
    if not storage.isfile(path):
        return []
    records = []
    for line in storage.read_text(path).splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            pass
    return records

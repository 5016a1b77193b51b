"""What a run reports: log lines, TensorBoard scalars, `log_history.jsonl`, and the results JSON files.

Only process 0 writes files; the other hosts log errors only.
"""

import json
import logging
import math
import os
import time

import datasets
import jax
import numpy as np
import transformers

RESULT_FILES = ("train_results.json", "eval_results.json", "test_results.json", "all_results.json")


def setup_logging():
    level = logging.INFO if jax.process_index() == 0 else logging.ERROR
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level,
                        force=True)
    logging.getLogger().setLevel(level)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    for noisy in ("orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns through absl about routine read-only lookups


def _step_of(line: str) -> float:
    """The step of a log_history line; a line a kill cut short counts as past any resume point."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


class MetricsWriter:
    """TensorBoard scalars plus one JSON line per logged step in `log_history.jsonl`.

    On resume from step N, lines of the interrupted run after N are dropped, so the history reads as one run.
    """

    def __init__(self, output_dir: str, resumed_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(output_dir, exist_ok=True)
        self.history_path = os.path.join(output_dir, "log_history.jsonl")
        kept = []
        if resumed_step and os.path.exists(self.history_path):
            with open(self.history_path) as f:
                kept = [line for line in f if _step_of(line) <= resumed_step]
        with open(self.history_path, "w") as f:
            f.writelines(kept)
        # Hides what an earlier or interrupted run logged after the step this run starts from.
        self.tensorboard = SummaryWriter(logdir=output_dir, purge_step=resumed_step + 1)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        with open(self.history_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self):
        if self.enabled:
            self.tensorboard.close()


def clear_results(output_dir: str):
    """Removes results of an earlier run, so an interrupted run never looks finished."""
    if jax.process_index() == 0:
        for name in RESULT_FILES:
            path = os.path.join(output_dir, name)
            if os.path.exists(path):
                os.remove(path)


def write_results(output_dir: str, split: str, metrics: dict):
    """Writes `{split}_results.json` and merges the same metrics into `all_results.json`."""
    if jax.process_index() != 0:
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{split}_results.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    all_path = os.path.join(output_dir, "all_results.json")
    merged = {}
    if os.path.exists(all_path):
        with open(all_path) as f:
            merged = json.load(f)
    merged.update(metrics)
    with open(all_path, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)


class TrainProgress:
    """Collects the per-step metrics (`loss_sum`, `weight`) and turns them into one record per logging interval.

    Device values are read only when a record is made, so the host does not wait for every step.
    """

    def __init__(self, schedule, tokens_per_step: int, steps_per_epoch: int, start_step: int):
        self.schedule, self.tokens_per_step, self.steps_per_epoch = schedule, tokens_per_step, steps_per_epoch
        self.pending, self.last_step, self.last_time = [], start_step, time.perf_counter()

    def add(self, metrics):
        self.pending.append(metrics)

    def _loss(self, step: int) -> float:
        """Token-weighted loss over the pending steps; raises if it is NaN or infinite."""
        sums = jax.tree.map(lambda *xs: sum(np.asarray(x.addressable_data(0), np.float64) for x in xs),
                            *self.pending)
        loss = float(sums["loss_sum"] / max(sums["weight"], 1.0))
        if not math.isfinite(loss):
            raise FloatingPointError(f"The training loss is {loss} in steps {self.last_step + 1}-{step}: stopping. "
                                     "Try a lower --learning_rate, more --warmup_steps or --max_grad_norm.")
        return loss

    def check(self, step: int):
        if self.pending:
            self._loss(step)

    def record(self, step: int) -> dict:
        loss = self._loss(step)
        now = time.perf_counter()
        record = {
            "train/loss": loss,
            "train/learning_rate": float(self.schedule(step - 1)),
            "train/epoch": step / self.steps_per_epoch,
            "train/tokens_per_second": self.tokens_per_step * (step - self.last_step) / (now - self.last_time),
        }
        self.pending, self.last_step, self.last_time = [], step, now
        return record

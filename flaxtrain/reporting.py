"""What a run reports: log lines, TensorBoard scalars, `log_history.jsonl`, and the results JSON files.

Only process 0 writes files; the other hosts log errors only.
"""

import json
import logging
import math
import time

import datasets
import jax
import numpy as np
import transformers

from flaxtrain import storage

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


def finite_json(value):
    """`value` with every NaN and infinity replaced by None, so that strict JSON parsers read the file (json.dump
    would write the non-standard NaN and Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def _step_of(line: str) -> float:
    """The step of a log_history line; a line a kill cut short counts as past any resume point."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


class MetricsWriter:
    """TensorBoard scalars plus one JSON line per logged step in `log_history.jsonl`.

    On resume from step N, lines of the interrupted run after N are dropped, so the history reads as one run. The
    history is rewritten whole at each write (it is small), so that it works the same in a bucket, where files
    cannot be appended to.
    """

    def __init__(self, output_dir: str, resumed_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.history_path = storage.join(output_dir, "log_history.jsonl")
        self.lines = []
        if resumed_step and storage.isfile(self.history_path):
            self.lines = [line + "\n" for line in storage.read_text(self.history_path).splitlines()
                          if _step_of(line) <= resumed_step]
        storage.write_text(self.history_path, "".join(self.lines))
        # Hides what an earlier or interrupted run logged after the step this run starts from.
        self.tensorboard = tensorboard_writer(output_dir, purge_step=resumed_step + 1)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        self.lines.append(dumps({"step": step, **metrics}) + "\n")
        storage.write_text(self.history_path, "".join(self.lines))

    def close(self):
        if self.enabled:
            self.tensorboard.close()


def tensorboard_writer(output_dir: str, purge_step: int):
    from tensorboardX import SummaryWriter

    storage.makedirs(output_dir)
    return SummaryWriter(logdir=output_dir, purge_step=purge_step)


def clear_results(output_dir: str):
    """Removes results of an earlier run, so an interrupted run never looks finished."""
    if jax.process_index() == 0:
        for name in RESULT_FILES:
            storage.remove(storage.join(output_dir, name))


def write_results(output_dir: str, split: str, metrics: dict):
    """Writes `{split}_results.json` and merges the same metrics into `all_results.json` (NaN and infinities, as
    the perplexity of a diverged run, as null)."""
    if jax.process_index() != 0:
        return
    storage.write_text(storage.join(output_dir, f"{split}_results.json"), dumps(metrics, indent=2, sort_keys=True))
    all_path = storage.join(output_dir, "all_results.json")
    merged = json.loads(storage.read_text(all_path)) if storage.isfile(all_path) else {}
    merged.update(metrics)
    storage.write_text(all_path, dumps(merged, indent=2, sort_keys=True))


class TrainProgress:
    """Collects the per-step metrics (`loss_sum`, `weight`) and turns them into one record per logging interval.

    Device values are read only when a record is made, so the host does not wait for every step. `carried`: the
    sums of the steps after the last record that a resumed run's checkpoint saved (see `carry`), so that its
    first record is the uninterrupted run's.
    """

    def __init__(self, schedule, tokens_per_step: int, steps_per_epoch: int, start_step: int,
                 carried: dict | None = None):
        self.schedule, self.tokens_per_step, self.steps_per_epoch = schedule, tokens_per_step, steps_per_epoch
        self.pending, self.carried = [], carried
        self.logged_step = carried["since"] if carried else start_step
        self.last_step, self.last_time = start_step, time.perf_counter()

    def add(self, metrics):
        self.pending.append(metrics)

    def _loss(self, step: int) -> tuple[float, float]:
        """(loss sum, weight) over the steps since the last record; raises if the loss is NaN or infinite."""
        loss_sum, weight = (self.carried["loss_sum"], self.carried["weight"]) if self.carried else (0.0, 0.0)
        for metrics in self.pending:  # in step order, so that a resumed run adds up exactly as the whole one
            loss_sum += float(np.asarray(metrics["loss_sum"].addressable_data(0), np.float64))
            weight += float(np.asarray(metrics["weight"].addressable_data(0), np.float64))
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"The training loss is {loss_sum} in steps {self.logged_step + 1}-{step}: "
                                     "stopping. Try a lower --learning_rate, more --warmup_steps or --max_grad_norm.")
        return loss_sum, weight

    def check(self, step: int):
        if self.pending:
            self._loss(step)

    def carry(self, step: int) -> dict | None:
        """The sums since the last record, for a checkpoint (JSON: float64 values round-trip exactly); checks them."""
        if not (self.pending or self.carried):
            return None
        loss_sum, weight = self._loss(step)
        return {"since": self.logged_step, "loss_sum": loss_sum, "weight": weight}

    def record(self, step: int) -> dict:
        loss_sum, weight = self._loss(step)
        now = time.perf_counter()
        record = {
            "train/loss": loss_sum / max(weight, 1.0),
            "train/learning_rate": float(self.schedule(step - 1)),
            "train/epoch": step / self.steps_per_epoch,
            "train/tokens_per_second": self.tokens_per_step * (step - self.last_step) / (now - self.last_time),
        }
        self.pending, self.carried, self.logged_step, self.last_step, self.last_time = [], None, step, step, now
        return record

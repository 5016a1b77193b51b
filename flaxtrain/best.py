"""--load_best_model_at_end: remember the evaluation with the best metric and its weights (used by `loop.train`).

Each evaluation during training goes through `BestModel.update`. A new best is kept in host memory (on every host:
the metrics are the same everywhere, so every host takes the same decision) and written by process 0 to
output_dir/best_model/ (params.safetensors by params path, and best.json naming the step and metrics), so that a
resumed run knows it. At the end `restore` puts the best weights in place of the last ones.

A resumed run (one host) picks up best_model/ when its step is not past the step resumed from; on several hosts the
earlier best is forgotten (not every host may see output_dir) and tracking starts again at the resumed step.
"""

import json
import logging
import os
import shutil

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from flaxtrain import parallel

logger = logging.getLogger(__name__)


class BestModel:
    def __init__(self, output_dir: str, metric: str, greater_is_better: bool | None, start_step: int):
        self.dir = os.path.join(output_dir, "best_model")
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater = not self.metric.endswith("loss") if greater_is_better is None else greater_is_better
        self.record, self.params = None, None
        record_file = os.path.join(self.dir, "best.json")
        if start_step and jax.process_count() == 1 and os.path.exists(record_file):
            with open(record_file) as f:
                record = json.load(f)
            if record["step"] <= start_step and record["metric"] == self.metric:
                self.record = record
        if self.record is None and jax.process_index() == 0 and os.path.isdir(self.dir):
            shutil.rmtree(self.dir)  # an earlier run's, or from after the step resumed from

    def update(self, step: int, metrics: dict, params) -> bool:
        """Records `metrics` of the model at `step`; when they are the best so far, keeps `params` (replicated
        device arrays) on the host and writes them to best_model/ on process 0. Returns whether this was a new best."""
        if self.metric not in metrics:
            raise ValueError(f"--metric_for_best_model: the evaluation has no {self.metric}; it has "
                             f"{', '.join(sorted(k for k in metrics if k.startswith('eval_')))}.")
        value = metrics[self.metric]
        if self.record is not None:
            best = self.record["value"]
            if not (value > best if self.greater else value < best):
                return False
        self.record = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
        self.params = parallel.fetch(params)
        if jax.process_index() == 0:
            os.makedirs(self.dir, exist_ok=True)
            record_file = os.path.join(self.dir, "best.json")
            if os.path.exists(record_file):
                os.remove(record_file)  # no best.json next to half-written weights if the write is killed
            flat = {"/".join(path): np.asarray(v) for path, v in traverse_util.flatten_dict(self.params).items()}
            safetensors.numpy.save_file(flat, os.path.join(self.dir, "params.safetensors"))
            with open(record_file, "w") as f:
                json.dump(self.record, f, indent=2)
        logger.info("New best model at step %d: %s = %.4g", step, self.metric, value)
        return True

    def restore(self, state, mesh):
        """`state` with the best weights in place of its own (replicated over `mesh`)."""
        params = self.params
        if params is None:  # found on disk when this run resumed
            flat = safetensors.numpy.load_file(os.path.join(self.dir, "params.safetensors"))
            params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
        logger.info("Loading the best model: step %d, %s = %.4g", self.record["step"], self.metric,
                    self.record["value"])
        return state.replace(params=parallel.replicate(params, mesh))

    def results(self) -> dict:
        """The best evaluation's metrics, with the step it was made at."""
        return {**self.record["metrics"], "eval_best_step": self.record["step"]}

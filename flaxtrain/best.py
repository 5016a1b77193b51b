"""--load_best_model_at_end: remember the evaluation with the best metric and its weights (used by `loop.train`).

Each evaluation during training goes through `BestModel.update`. A new best is kept in host memory (on every host:
the metrics are the same everywhere, so every host takes the same decision) and written by process 0 to
output_dir/best_model/STEP.safetensors (params by path; best.json says which, for people). Every training
checkpoint carries the best record of its time in its metadata (`checkpoint_meta`), so a resumed run continues with
the best that its checkpoint knew, and reads those weights back at the end. Weights files that no newer checkpoint
refers to are removed at each save. Multi-host runs need output_dir on a shared file system for that, as orbax
checkpoints do.
"""

import logging
import math

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from flaxtrain import parallel, storage
from flaxtrain.logging import dumps

logger = logging.getLogger(__name__)
DIRECTORY = "best_model"


class BestModel:
    def __init__(self, output_dir: str, metric: str, greater_is_better: bool | None, resumed: dict | None):
        """resumed: the "best" record of the checkpoint this run resumed from (None: a fresh start)."""
        self.dir = storage.join(output_dir, DIRECTORY)
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater = not self.metric.endswith("loss") if greater_is_better is None else greater_is_better
        self.record, self.params = None, None
        if resumed is not None and resumed["value"] is None:  # NaN, saved as JSON's null
            resumed = {**resumed, "value": math.nan}
        if resumed is not None and resumed["metric"] == self.metric:
            if storage.isfile(self._weights(resumed["step"])):
                self.record = resumed
            else:
                logger.warning("The best model of the checkpoint resumed from (step %d) is not in %s: the best is "
                               "tracked again from here.", resumed["step"], self.dir)
        elif resumed is None and jax.process_index() == 0:
            storage.remove(self.dir)  # an earlier run's

    def _weights(self, step: int) -> str:
        return storage.join(self.dir, f"{step}.safetensors")

    def _better(self, value) -> bool:
        if self.record is None:
            return True
        best = self.record["value"]
        if math.isnan(value) or math.isnan(best):  # NaN (e.g. Pearson of constant predictions) is the worst
            return math.isnan(best) and not math.isnan(value)
        return value > best if self.greater else value < best

    def update(self, step: int, metrics: dict, params) -> bool:
        """Records `metrics` of the model at `step`; when they are the best so far, keeps `params` (replicated
        device arrays) on the host and writes them to best_model/ on process 0. Returns whether this was a new best."""
        if self.metric not in metrics:
            raise ValueError(f"--metric_for_best_model: the evaluation has no {self.metric}; it has "
                             f"{', '.join(sorted(k for k in metrics if k.startswith('eval_')))}.")
        value = float(metrics[self.metric])
        if not self._better(value):
            return False
        self.record = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
        self.params = parallel.fetch(params)
        if jax.process_index() == 0:
            flat = {"/".join(path): np.asarray(v) for path, v in traverse_util.flatten_dict(self.params).items()}
            storage.write_bytes(self._weights(step), safetensors.numpy.save(flat))
            storage.write_text(storage.join(self.dir, "best.json"), dumps(self.record, indent=2))
        logger.info("New best model at step %d: %s = %.4g", step, self.metric, value)
        return True

    def checkpoint_meta(self, meta: dict) -> dict:
        """`meta` for the training checkpoint being saved, with the best record; removes the other weights files
        (earlier bests, or a killed run's later ones), which this and later checkpoints do not refer to."""
        if self.record is None:
            return meta
        if jax.process_index() == 0:
            for name in storage.listdir(self.dir):
                if name.endswith(".safetensors") and name != f"{self.record['step']}.safetensors":
                    storage.remove(storage.join(self.dir, name))
        return {**meta, "best": self.record}

    def restore(self, state, mesh):
        """`state` with the best weights in place of its own (replicated over `mesh`)."""
        params = self.params
        if params is None:  # the best of the checkpoint this run resumed from
            flat = safetensors.numpy.load(storage.read_bytes(self._weights(self.record["step"])))
            params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
        logger.info("Loading the best model: step %d, %s = %.4g", self.record["step"], self.metric,
                    self.record["value"])
        return state.replace(params=parallel.replicate(params, mesh))

    def results(self) -> dict:
        """The best evaluation's metrics, with the step it was made at."""
        return {**self.record["metrics"], "eval_best_step": self.record["step"]}

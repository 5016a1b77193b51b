"""--load_best_model_at_end: remember the evaluation with the best metric and its weights (used by `loop.train`).

Each evaluation during training goes through `BestModel.update`, on every host (the metrics are the same
everywhere, so every host takes the same decision). A new best is saved with orbax to output_dir/best_model/STEP:
the params as they lie on the devices, each host writing its shards, in the background (best_model/best.json says
which step, for people). Every training checkpoint carries the best record of its time in its metadata
(`checkpoint_meta`), so a resumed run continues with the best that its checkpoint knew, and reads those weights back
at the end, onto the mesh of its own. Best weights that no newer checkpoint refers to are removed at each save.
"""

import logging
import math

import jax
import orbax.checkpoint as ocp

from flaxtrain import storage
from flaxtrain.reporting import dumps

logger = logging.getLogger(__name__)
DIRECTORY = "best_model"


class BestModel:
    def __init__(self, output_dir: str, metric: str, greater_is_better: bool | None, resumed: dict | None):
        """resumed: the "best" record of the checkpoint this run resumed from (None: a fresh start)."""
        self.dir = storage.join(storage.absolute(output_dir), DIRECTORY)
        self.metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        self.greater = not self.metric.endswith("loss") if greater_is_better is None else greater_is_better
        self.record = None
        if resumed is None and jax.process_index() == 0:
            storage.remove(self.dir)  # an earlier run's
        self.saved = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(create=True))
        if resumed is not None and resumed["value"] is None:  # NaN, saved as JSON's null
            resumed = {**resumed, "value": math.nan}
        if resumed is not None and resumed["metric"] == self.metric:
            if resumed["step"] in self.saved.all_steps():
                self.record = resumed
            else:
                logger.warning("The best model of the checkpoint resumed from (step %d) is not in %s: the best is "
                               "tracked again from here.", resumed["step"], self.dir)
        self._keep_only(self.record)  # a killed run's later bests: no checkpoint refers to them, and orbax saves
        # only steps after its newest

    def _better(self, value) -> bool:
        if self.record is None:
            return True
        best = self.record["value"]
        if math.isnan(value) or math.isnan(best):  # NaN (e.g. Pearson of constant predictions) is the worst
            return math.isnan(best) and not math.isnan(value)
        return value > best if self.greater else value < best

    def update(self, step: int, metrics: dict, params) -> bool:
        """Records `metrics` of the model at `step`; when they are the best so far, saves `params` (device arrays,
        split as they are) in the background. Returns whether this was a new best."""
        if self.metric not in metrics:
            raise ValueError(f"--metric_for_best_model: the evaluation has no {self.metric}; it has "
                             f"{', '.join(sorted(k for k in metrics if k.startswith('eval_')))}.")
        value = float(metrics[self.metric])
        if not self._better(value):
            return False
        self.record = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
        self.saved.save(step, args=ocp.args.StandardSave(params), force=True)
        if jax.process_index() == 0:
            storage.write_text(storage.join(self.dir, "best.json"), dumps(self.record, indent=2))
        logger.info("New best model at step %d: %s = %.4g", step, self.metric, value)
        return True

    def checkpoint_meta(self, meta: dict) -> dict:
        """`meta` for the training checkpoint being saved, with the best record; removes the other best weights
        (earlier bests, or a killed run's later ones), which this and later checkpoints do not refer to."""
        if self.record is None:
            return meta
        self._keep_only(self.record)
        return {**meta, "best": self.record}

    def _keep_only(self, record: dict | None):
        self.saved.wait_until_finished()
        for step in self.saved.all_steps():
            if record is None or step != record["step"]:
                self.saved.delete(step)

    def restore(self, state):
        """`state` with the best weights in place of its own, split as its params are."""
        self.saved.wait_until_finished()
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
        params = self.saved.restore(self.record["step"], args=ocp.args.StandardRestore(like))
        logger.info("Loading the best model: step %d, %s = %.4g", self.record["step"], self.metric,
                    self.record["value"])
        return state.replace(params=params)

    def results(self) -> dict:
        """The best evaluation's metrics, with the step it was made at."""
        return {**self.record["metrics"], "eval_best_step": self.record["step"]}

    def close(self):
        self.saved.wait_until_finished()
        self.saved.close()

"""The training loop every script shares: steps, logging, evaluation and saving at their cadences.

The task-specific parts come in as arguments: the compiled per-device step, the host batches, an `evaluate(state)`
and an `export(params)` that writes the Hugging Face model.
"""

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxtrain import checkpoint, data, example_rng, parallel, preemption, storage
from flaxtrain.best import BestModel
from flaxtrain.reporting import MetricsWriter, TrainProgress, clear_results

logger = logging.getLogger(__name__)


def as_scalars(prefix: str, metrics: dict) -> dict:
    """{"eval_loss": x} -> {"eval/loss": x}: results-file names to TensorBoard tags."""
    return {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def layout(model, family, tx, shape) -> parallel.StateLayout:
    """The mesh of `shape` (a settings.MeshShape: --fsdp, --tensor_parallel), and where the model's train state
    lies on it (the axis rules with --logical_axis_rules applied, logged once)."""
    mesh = parallel.make_mesh(shape.fsdp, shape.tensor_parallel)
    rules = parallel.load_rules(shape.logical_axis_rules)
    logger.info("Mesh %s; logical axes -> mesh axes: %s", dict(mesh.shape),
                ", ".join(f"{name} {'/'.join(axes) or '-'}" for name, axes in rules.items()))
    return parallel.StateLayout(model, family.init_params, tx, mesh, rules)


def start_state(layout, run, train_examples: int, *, seed: int, load=None):
    """The TrainState, split over the mesh as `layout` (parallel.StateLayout) says: restored from `run.checkpoint`
    (resume.start's answer) straight into its shards, falling back to older checkpoints past one whose state does
    not restore; else created from params initialised from `seed`, or, when `load` is set, loaded by
    `load(eval_shape'd params, place=..., init=...)` (pretrained weights: pretrained.load_weights with the script's
    rules; `init()` gives the initialised params it needs for weights the checkpoint lacks). Returns (state, its
    step, the metadata this run saves with its checkpoints: its record, `train_examples`, and the best-model record and
    unlogged progress it resumed with)."""
    meta = {**run.record, "train_examples": train_examples}
    while run.checkpoint is not None:
        saved = run.checkpoint.meta
        if saved.get("train_examples", train_examples) != train_examples:
            run.check(run.checkpoint, extra=[("train_examples", saved["train_examples"], train_examples)])
        try:
            restored, _ = checkpoint.restore(run.checkpoint.directory, run.checkpoint.step, layout.abstract_state())
        except Exception as error:  # noqa: BLE001  (a damaged checkpoint: orbax and tensorstore raise many kinds)
            run.fall_back(error)
            continue
        meta.update({key: saved[key] for key in ("best", "progress") if key in saved})
        return restored, int(parallel.fetch(restored.step)), meta
    key = jax.random.key(seed)
    if load is None:
        params = layout.init(key)
    else:  # initialised only if the checkpoint lacks a weight (a new head): init compiles the whole model
        params = load(jax.eval_shape(layout.init, key), place=layout.place, init=lambda: layout.init(key))
    return layout.create(params), 0, meta


def resume_input(run, start_step: int, input_iterator):
    """A stream's iterator put where this host's input stood at the checkpoint that `start_state` resumed from
    (`run`: resume.start's answer); left at the start for a fresh run."""
    if start_step:
        checkpoint.restore_input(run.checkpoint.directory, start_step, input_iterator)
    return input_iterator


def eval_batches(make_batch, num_examples: int, mesh, global_batch: int, seed: int):
    """Yields (global batch, number of real rows) covering every example once, in order.

    make_batch(indices, keys) builds this host's rows of a global batch: `indices` int [b] are the rows' example
    indices, `keys` uint64 [b] their example_rng keys (seed, 3, index), so that random masks are the same at every
    evaluation and on any number of hosts. The last batch is padded (data.eval_batches); where the batch has
    "weights", the padding rows get weight zero.
    """
    rows = parallel.host_rows(mesh, global_batch)
    for indices, n_real in data.eval_batches(num_examples, global_batch):
        host = make_batch(indices[rows], example_rng.keys(seed, 3, indices[rows]))  # 3: see data.RNG_STREAMS
        if "weights" in host:
            host["weights"][rows >= n_real] = 0
        yield parallel.to_global(host, mesh, global_batch), n_real


def host_eval_batches(make_batch, host_examples: int, mesh, global_batch: int, seed: int):
    """Like `eval_batches`, for examples that each host holds its own of (a stream's evaluation blocks: this host's
    share, `host_examples` of them): make_batch(indices, keys) gets indices into this host's examples. Hosts hold
    different numbers of them: every host makes as many batches as the host with the most, its rows past its own
    examples at weight zero. Yields global batches."""
    rows = len(parallel.host_rows(mesh, global_batch))
    share = parallel.host_share(mesh, global_batch)[0]
    for begin in range(0, parallel.agree_max(host_examples), rows):
        local = np.arange(begin, begin + rows)
        host = make_batch(np.where(local < host_examples, local, 0), example_rng.keys(seed, 5, share, local))
        host["weights"][local >= host_examples] = 0  # 5: see data.RNG_STREAMS
        yield parallel.to_global(host, mesh, global_batch)


def evaluate(state, p_eval_step, make_batch, num_examples: int, mesh, global_batch: int, seed: int,
             per_host: bool = False) -> dict:
    """Loss, accuracy and perplexity over every example once.

    p_eval_step(state, batch) returns the global batch's {"loss", "accuracy", "weight"} sums; make_batch builds this
    host's rows with "weights" (see `eval_batches`; with `per_host`, `host_eval_batches`).
    """
    totals = None
    batches = (host_eval_batches(make_batch, num_examples, mesh, global_batch, seed) if per_host else
               (batch for batch, _ in eval_batches(make_batch, num_examples, mesh, global_batch, seed)))
    for batch in batches:
        sums = p_eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = parallel.fetch(totals)
    weight = max(float(totals["weight"]), 1.0)
    loss = float(totals["loss"]) / weight
    return {"eval_loss": loss, "eval_accuracy": float(totals["accuracy"]) / weight,
            "eval_perplexity": math.exp(loss) if loss < 700 else float("inf")}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A training run in numbers."""

    start_step: int
    total_steps: int
    steps_per_epoch: int
    schedule: Any  # step -> learning rate, for the logs
    rows: int  # examples per optimizer update: the rows of every global batch
    tokens_per_step: int  # for tokens per second


@dataclasses.dataclass(frozen=True)
class Hook:
    """Work the loop does after every `every`-th step: `run(step, state, metrics)`."""

    every: int
    run: Callable


def run_steps(state, step_fn, batches, plan: Plan, *, mesh, seed: int, hooks: list[Hook], on_signal: Callable):
    """The loop: `step_fn(state, batch, dropout_rng)` on each of `batches` (host dicts of this host's rows) for the
    steps after plan.start_step up to plan.total_steps; after each step, the hooks that are due, in order. SIGTERM
    or SIGINT (every host after the same step): `on_signal(step, state, signum)`, which must not return. Returns
    the state after the last step.

    A host whose input ends or fails (a bad record in its share of a stream) never leaves the others waiting in a
    step: it takes part in the step with its last batch at weight zero while all hosts learn of it, then every
    host stops after the same step, that host with its own error; before the first step, every host stops at once.
    """
    dropout_rng = jax.random.key(seed + 1)  # the step folds its step number in
    step, last, failure, batches = plan.start_step, None, None, iter(batches)
    with preemption.StopSignal(mesh) as stop:
        while step < plan.total_steps:
            try:
                host_batch = next(batches, None)
            except Exception as error:  # noqa: BLE001  (raised below, once every host knows)
                failure, host_batch = error, None
            if last is None:
                try:
                    parallel.all_hosts_have(host_batch is not None, "no training batch: its share of the data is "
                                                                    "shorter than one batch, or it failed")
                except ValueError:
                    if failure is not None:  # this host's own reason, rather than that it has no batch
                        raise failure from None
                    raise
            if host_batch is None:
                stop.out_of_data()
                host_batch = {k: np.zeros_like(v) if k == "weights" else v for k, v in last.items()}
            last = host_batch
            state, metrics = step_fn(state, parallel.to_global(host_batch, mesh, plan.rows), dropout_rng)
            step += 1
            for hook in hooks:
                if step % hook.every == 0:
                    hook.run(step, state, metrics)
            signum = stop.should_stop()
            if signum == preemption.OUT_OF_DATA:
                break
            if signum and step < plan.total_steps:
                on_signal(step, state, signum)
    if failure is not None:
        raise failure
    if step < plan.total_steps:
        raise RuntimeError(f"The training data ran out at step {step} of {plan.total_steps} (on this host or "
                           "another: see each host's log).")
    return state


@dataclasses.dataclass
class Outcome:
    """What loop.train did: the final state (the best model's with --load_best_model_at_end), the training
    metrics and the last evaluation's (None without evaluation); `trained` False when the checkpoint resumed
    from was already the last step (its run's results stand)."""

    state: Any
    train_metrics: Optional[dict] = None
    eval_metrics: Optional[dict] = None
    trained: bool = True


class Run:
    """What a training run writes besides its steps: log records (TensorBoard, log_history.jsonl, the bar),
    evaluations and the best model, checkpoints with the export and the Hub push. Every host makes one; `hooks()`
    are what the loop runs after its steps.

    output, cadence: settings.Output and settings.Cadence. `evaluate(state)` gives the eval metrics (None: no
    evaluation), `export(params)` writes the Hugging Face model, `hub` (hub.connect's answer) is told of every save,
    `input_iterator` is a stream's Grain iterator, whose position every checkpoint saves."""

    def __init__(self, output, cadence, plan: Plan, *, evaluate, export, meta: dict, hub=None,
                 best_metric: str = "eval_loss", input_iterator=None):
        self.output, self.cadence, self.plan = output, cadence, plan
        self.evaluate, self.export, self.meta, self.hub = evaluate, export, meta, hub
        self.input_iterator = input_iterator
        resumed = plan.start_step > 0
        self.best = None
        if output.best is not None and evaluate:
            self.best = BestModel(output.directory, output.best.metric or best_metric, output.best.greater_is_better,
                                  meta.get("best") if resumed else None)
        self.checkpoints = self.writer = None

    def open(self):
        """Starts the run's outputs (after the results of an earlier run are cleared)."""
        output, plan = self.output, self.plan
        clear_results(output.directory)
        self.writer = MetricsWriter(output.directory, plan.start_step)
        self.checkpoints = checkpoint.Checkpoints(output.directory, output.save_total_limit)
        self.progress = TrainProgress(plan.schedule, plan.tokens_per_step, plan.steps_per_epoch, plan.start_step,
                                      self.meta.pop("progress", None) if plan.start_step else None)
        self.bar = tqdm(total=plan.total_steps, initial=plan.start_step, desc="training",
                        disable=jax.process_index() != 0)
        self.record, self.started = {}, time.perf_counter()

    def hooks(self) -> list[Hook]:
        cadence = self.cadence
        hooks = [Hook(1, self.count), Hook(cadence.logging_steps, self.log)]
        if self.evaluate:
            hooks.append(Hook(cadence.eval_steps, self.evaluate_between))
        return hooks + [Hook(cadence.save_steps, self.save_between)]

    # ------------------------------------------------------------------------------------------------ hooks
    def count(self, step, state, metrics):
        self.bar.update(1)
        self.progress.add(metrics)
        if step == self.plan.total_steps and step % self.cadence.logging_steps:
            self.log(step, state, metrics)  # the last step is always logged

    def log(self, step, state, metrics):
        self.record = self.progress.record(step)
        self.writer.write(step, self.record)
        logger.info("step %d: %s", step, ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in self.record.items()))
        self.bar.set_postfix(loss=f"{self.record['train/loss']:.4f}", lr=f"{self.record['train/learning_rate']:.2e}")

    def evaluate_between(self, step, state, metrics):
        if step < self.plan.total_steps:  # the last evaluation is `finish`'s, before the last save
            logger.info("step %d: %s", step, self.evaluation(step, state))

    def save_between(self, step, state, metrics):
        if step < self.plan.total_steps:  # the last save is `finish`'s
            self.save(step, state)

    def evaluation(self, step, state) -> dict:
        metrics = self.evaluate(state)
        self.writer.write(step, as_scalars("eval", metrics))
        if self.best is not None:
            self.best.update(step, metrics, state.params)
        return metrics

    def save(self, step, state, exported=None):
        """A checkpoint of `state`, and the model export of `exported` (default: state's params; every host calls
        the export, which gathers the params one tensor at a time)."""
        # Never save or export weights a NaN loss came from; the progress since the last log line rides along, so
        # that a run resumed from here logs what the uninterrupted run logs.
        saved = {**self.meta, "progress": self.progress.carry(step)}
        self.checkpoints.save(step, state, saved if self.best is None else self.best.checkpoint_meta(saved),
                              self.input_iterator)
        self.export(state.params if exported is None else exported)
        if self.hub is not None:
            self.hub.push(step)

    # -------------------------------------------------------------------------------------------- the ends
    def stop(self, step, state, signum):
        """SIGTERM or SIGINT: saves this step (unless just saved), closes everything, exits with 128 + signum."""
        if step % self.cadence.save_steps:
            self.save(step, state)
        self.close()
        logger.warning("Stopped by %s after step %d of %d: saved the checkpoint %s and the model in %s. Run the "
                       "same command to resume.", signal.Signals(signum).name, step, self.plan.total_steps,
                       storage.join(self.checkpoints.directory, str(step)), self.output.directory)
        raise preemption.Preempted(128 + signum)

    def finish(self, state):
        """After the last step: the last evaluation (before the last save, so that the checkpoint's best record
        includes it), the best model in place of the last if asked, the last save. Returns (final state, train
        metrics, eval metrics or None)."""
        step = self.plan.total_steps
        train_metrics = {"train_loss": self.record.get("train/loss"),
                         "train_runtime": time.perf_counter() - self.started, "train_steps": step,
                         "epoch": step / self.plan.steps_per_epoch}
        self.progress.check(step)
        eval_metrics = self.evaluation(step, state) if self.evaluate else None
        final = state
        if self.best is not None:
            if self.best.record["step"] != step:
                final = self.best.restore(state)
            eval_metrics = self.best.results()
        self.save(step, state, exported=final.params)  # the checkpoint holds the last state, the export the final model
        self.close()
        return Outcome(final, train_metrics, eval_metrics)

    def close(self):
        self.bar.close()
        self.checkpoints.wait()
        self.checkpoints.close()
        if self.best is not None:
            self.best.close()
        self.writer.close()


def train(state, step_fn, batches, plan: Plan, run: Run, *, mesh, seed: int, hooks: Optional[list] = None) -> Outcome:
    """Trains `state` with the compiled `step_fn(state, batch, dropout_rng)` on `batches` (host dicts of this
    host's rows, from plan.start_step on) until plan.total_steps, running `hooks` after the steps (default:
    run.hooks(): log every --logging_steps and after the last step, evaluate every --eval_steps, save a checkpoint
    and export the model every --save_steps); at the end `run` evaluates once more and saves. Returns the Outcome;
    when the checkpoint resumed from is already the last step, nothing is trained and that run's results stand.

    SIGTERM or SIGINT stops the run after the step in flight (on every host after the same step), with a checkpoint
    and export of that step: `preemption.Preempted` is raised, which exits with 128 + the signal number.

    With --load_best_model_at_end the weights of the best evaluation by --metric_for_best_model (default the
    task's main metric) replace the last ones at the end: in the returned state and the exported model, and the
    returned eval metrics are that evaluation's, with "eval_best_step"."""
    try:
        if plan.start_step >= plan.total_steps:
            logger.warning("The checkpoint resumed from is already at the last step (%d): nothing to train.",
                           plan.start_step)
            if run.best is not None:
                if run.best.record is not None:  # what follows (e.g. --do_predict) uses the best model
                    state = run.best.restore(state)
                    run.export(state.params)
                run.best.close()
            return Outcome(state, trained=False)
        run.open()
        state = run_steps(state, step_fn, batches, plan, mesh=mesh, seed=seed,
                          hooks=run.hooks() if hooks is None else hooks, on_signal=run.stop)
        return run.finish(state)
    finally:
        if run.input_iterator is not None:
            run.input_iterator.close()  # its worker processes

"""The training loop every script shares: steps, logging, evaluation and saving at their cadences.

The task-specific parts come in as arguments: the compiled per-device step, the host batches, an `evaluate(state)`
and an `export(params)` that writes the Hugging Face model.
"""

import logging
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxtrain import checkpoint, data, parallel, preemption, storage
from flaxtrain.best import BestModel
from flaxtrain.logging import MetricsWriter, TrainProgress, clear_results

logger = logging.getLogger(__name__)


def as_scalars(prefix: str, metrics: dict) -> dict:
    """{"eval_loss": x} -> {"eval/loss": x}: results-file names to TensorBoard tags."""
    return {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def layout(model, family, tx, training_args) -> parallel.StateLayout:
    """The mesh of --fsdp and --tensor_parallel, and where the model's train state lies on it (the axis rules with
    --logical_axis_rules applied, logged once)."""
    mesh = parallel.make_mesh(training_args.fsdp, training_args.tensor_parallel)
    rules = parallel.load_rules(training_args.logical_axis_rules)
    logger.info("Mesh %s; logical axes -> mesh axes: %s", dict(mesh.shape),
                ", ".join(f"{name} {'/'.join(axes) or '-'}" for name, axes in rules.items()))
    return parallel.StateLayout(model, family.init_params, tx, mesh, rules)


def start_state(layout, run, train_examples: int, *, seed: int, load=None):
    """The TrainState, split over the mesh as `layout` (parallel.StateLayout) says: restored from `run.checkpoint`
    (resume.start's answer) straight into its shards, falling back to older checkpoints past one whose state does
    not restore; else created from params initialised from `seed`, then given to `load(params, place=...)` when
    set (pretrained weights: pretrained.load_weights with the script's rules). Returns (state, its step, the
    metadata this run saves with its checkpoints: its record, `train_examples`, and the best-model record and
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
    params = layout.init(jax.random.key(seed))
    if load is not None:
        params = load(params, place=layout.place)
    return layout.create(params), 0, meta


def eval_batches(make_batch, num_examples: int, mesh, global_batch: int, seed: int):
    """Yields (global batch, number of real rows) covering every example once, in order.

    make_batch(indices, rng) builds this host's rows of the global batch `indices`; its rng is seeded by the
    batch's position, so random masks are the same at every evaluation. The last batch is padded (data.eval_batches);
    where the batch has "weights", the padding rows get weight zero.
    """
    rows = parallel.host_rows(mesh, global_batch)
    for i, (indices, n_real) in enumerate(data.eval_batches(num_examples, global_batch)):
        host = make_batch(indices, np.random.default_rng([seed, 3, i]))  # 3: see data.RNG_STREAMS
        if "weights" in host:
            host["weights"][rows >= n_real] = 0
        yield parallel.to_global(host, mesh, global_batch), n_real


def evaluate(state, p_eval_step, make_batch, num_examples: int, mesh, global_batch: int, seed: int) -> dict:
    """Loss, accuracy and perplexity over every example once.

    p_eval_step(state, batch) returns the global batch's {"loss", "accuracy", "weight"} sums; make_batch builds this
    host's rows with "weights" (see `eval_batches`).
    """
    totals = None
    for batch, _ in eval_batches(make_batch, num_examples, mesh, global_batch, seed):
        sums = p_eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = parallel.fetch(totals)
    weight = max(float(totals["weight"]), 1.0)
    loss = float(totals["loss"]) / weight
    return {"eval_loss": loss, "eval_accuracy": float(totals["accuracy"]) / weight,
            "eval_perplexity": math.exp(loss) if loss < 700 else float("inf")}


def train(state, p_train_step, batches, *, args, mesh, rows: int, total_steps: int, steps_per_epoch: int,
          start_step: int, schedule, tokens_per_step: int, evaluate, export, meta: dict, hub=None,
          best_metric: str = "eval_loss"):
    """Runs `p_train_step(state, batch, dropout_rng)` on `batches` (host dicts of this host's rows, from
    `start_step` on) until `total_steps`; logs every --logging_steps, evaluates every --eval_steps (when
    `evaluate` is given), saves a checkpoint and the exported model every --save_steps, and at the end evaluates
    once more and saves. Returns (state, train metrics, final eval metrics or None); (state, None, None) when
    the checkpoint resumed from is already the last step, leaving that run's results alone. `hub` (hub.connect's
    answer) is told of every save, and pushes in the background.

    SIGTERM or SIGINT stops the run after the step in flight (on every host after the same step), with a checkpoint
    and export of that step: `preemption.Preempted` is raised, which exits with 128 + the signal number.

    With --load_best_model_at_end the weights of the best evaluation by --metric_for_best_model (default
    `best_metric`, the task's main metric) replace the last ones at the end: in the returned state and the exported
    model, and the returned eval metrics are that evaluation's, with "eval_best_step"."""
    def best_model():
        if not (args.load_best_model_at_end and evaluate):
            return None
        return BestModel(args.output_dir, args.metric_for_best_model or best_metric, args.greater_is_better,
                         meta.get("best") if start_step else None)

    if start_step >= total_steps:
        logger.warning("The checkpoint resumed from is already at the last step (%d): nothing to train.", start_step)
        best = best_model()
        if best is not None and best.record is not None:  # what follows (e.g. --do_predict) uses the best model
            state = best.restore(state)
            export(state.params)
        if best is not None:
            best.close()
        return state, None, None
    clear_results(args.output_dir)
    writer = MetricsWriter(args.output_dir, start_step)
    checkpoints = checkpoint.Checkpoints(args.output_dir, args.save_total_limit)
    progress = TrainProgress(schedule, tokens_per_step, steps_per_epoch, start_step,
                             meta.pop("progress", None) if start_step else None)
    bar = tqdm(total=total_steps, initial=start_step, desc="training", disable=jax.process_index() != 0)
    dropout_rng = jax.random.key(args.seed + 1)  # the step folds its step number in
    started, step, record = time.perf_counter(), start_step, {}
    best = best_model()

    def run_eval():
        metrics = evaluate(state)
        writer.write(step, as_scalars("eval", metrics))
        if best is not None:
            best.update(step, metrics, state.params)
        return metrics

    def save(exported=None):
        """A checkpoint of `state`, and the model export of `exported` (default: state's params; every host calls
        the export, which gathers the params one tensor at a time)."""
        # Never save or export weights a NaN loss came from; the progress since the last log line rides along, so
        # that a run resumed from here logs what the uninterrupted run logs.
        saved = {**meta, "progress": progress.carry(step)}
        checkpoints.save(step, state, saved if best is None else best.checkpoint_meta(saved))
        export(state.params if exported is None else exported)
        if hub is not None:
            hub.push(step)

    def stop(signum):
        if step % args.save_steps:
            save()
        checkpoints.wait()
        checkpoints.close()
        if best is not None:
            best.close()
        writer.close()
        bar.close()
        logger.warning("Stopped by %s after step %d of %d: saved the checkpoint %s and the model in %s. Run the "
                       "same command to resume.", signal.Signals(signum).name, step, total_steps,
                       storage.join(checkpoints.directory, str(step)), args.output_dir)
        raise preemption.Preempted(128 + signum)

    with preemption.StopSignal(mesh) as stop_signal:
        for host_batch in batches:
            if step >= total_steps:
                break
            state, metrics = p_train_step(state, parallel.to_global(host_batch, mesh, rows), dropout_rng)
            step += 1
            bar.update(1)
            progress.add(metrics)
            if step % args.logging_steps == 0 or step == total_steps:
                record = progress.record(step)
                writer.write(step, record)
                logger.info("step %d: %s", step, ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in record.items()))
                bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/learning_rate']:.2e}")
            if evaluate and step % args.eval_steps == 0 and step < total_steps:
                logger.info("step %d: %s", step, run_eval())
            if step % args.save_steps == 0 and step < total_steps:
                save()
            if (signum := stop_signal.should_stop()) and step < total_steps:
                stop(signum)
        bar.close()
        if step < total_steps:
            raise RuntimeError(f"The training data ran out at step {step} of {total_steps}.")
        train_metrics = {"train_loss": record.get("train/loss"), "train_runtime": time.perf_counter() - started,
                         "train_steps": total_steps, "epoch": step / steps_per_epoch}
        # The last evaluation comes before the last save, so that the checkpoint's best record includes it.
        progress.check(step)
        eval_metrics = run_eval() if evaluate else None
        final = state
        if best is not None:
            if best.record["step"] != step:
                final = best.restore(state)
            eval_metrics = best.results()
        save(exported=final.params)  # the checkpoint holds the last state, the export the final model
        checkpoints.wait()
        checkpoints.close()
        if best is not None:
            best.close()
        writer.close()
    return final, train_metrics, eval_metrics

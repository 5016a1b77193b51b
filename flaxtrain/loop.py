"""The training loop every script shares: steps, logging, evaluation and saving at their cadences.

The task-specific parts come in as arguments: the compiled per-device step, the host batches, an `evaluate(state)`
and an `export(params)` that writes the Hugging Face model.
"""

import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flaxtrain import checkpoint, data, parallel, training
from flaxtrain.best import BestModel
from flaxtrain.logging import MetricsWriter, TrainProgress, clear_results

logger = logging.getLogger(__name__)


def as_scalars(prefix: str, metrics: dict) -> dict:
    """{"eval_loss": x} -> {"eval/loss": x}: results-file names to TensorBoard tags."""
    return {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in metrics.items() if isinstance(v, (int, float))}


RESUME_KEYS = {"update_batch": "examples per update (batch size x devices x accumulation)",
               "train_examples": "training examples", "seed": "--seed", "optimizer": "optimizer flags"}


def run_meta(args, update_batch: int, train_examples: int) -> dict:
    """What a resumed run must share with the run that saved the checkpoint, for its batches and state to fit."""
    optimizer = "adafactor" if args.adafactor else "adamw"
    return {"update_batch": update_batch, "train_examples": train_examples, "seed": args.seed,
            "optimizer": f"{optimizer}, clip={bool(args.max_grad_norm and args.max_grad_norm > 0)}"}


def start_state(model, params, tx, mesh, resume, meta: dict):
    """The replicated TrainState, restored from `resume` (checkpoint.resolve_start's answer) when given, after
    checking that this run's `meta` (see `run_meta`) matches the checkpoint's; the checkpoint's best-model record
    (--load_best_model_at_end) is copied into `meta`. Returns (state, its step)."""
    state = parallel.replicate(training.TrainState.create(apply_fn=model.apply, params=params, tx=tx), mesh)
    if not resume:
        return state, 0
    saved = checkpoint.restore_meta(*resume)
    for key, what in RESUME_KEYS.items():
        if key in saved and saved[key] != meta[key]:
            raise ValueError(f"The checkpoint in {resume[0]} was trained with {what} = {saved[key]}, this run has "
                             f"{meta[key]}: resume with the same settings, or start over with "
                             "--resume_from_checkpoint=none --overwrite_output_dir.")
    if "best" in saved:
        meta["best"] = saved["best"]
    state, _ = checkpoint.restore(*resume, state)
    return state, int(parallel.fetch(state.step))


def eval_batches(make_batch, num_examples: int, mesh, global_batch: int, seed: int):
    """Yields (global batch, number of real rows) covering every example once, in order.

    make_batch(indices, rng) builds this host's rows of the global batch `indices`; its rng is seeded by the
    batch's position, so random masks are the same at every evaluation. The last batch is padded (data.eval_batches);
    where the batch has "weights", the padding rows get weight zero.
    """
    rows = parallel.local_rows(mesh, global_batch)
    for i, (indices, n_real) in enumerate(data.eval_batches(num_examples, global_batch)):
        host = make_batch(indices, np.random.default_rng([seed, 3, i]))  # 3: see data.RNG_STREAMS
        if "weights" in host:
            host["weights"][np.arange(rows.start, rows.stop) >= n_real] = 0
        yield parallel.to_global(host, mesh, global_batch), n_real


def evaluate(state, p_eval_step, make_batch, num_examples: int, mesh, global_batch: int, seed: int) -> dict:
    """Loss, accuracy and perplexity over every example once.

    p_eval_step(state, batch) returns psum'd {"loss", "accuracy", "weight"} sums; make_batch builds this host's rows
    with "weights" (see `eval_batches`).
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
            state = best.restore(state, mesh)
            if jax.process_index() == 0:
                export(parallel.fetch(state.params))
        return state, None, None
    clear_results(args.output_dir)
    writer = MetricsWriter(args.output_dir, start_step)
    checkpoints = checkpoint.Checkpoints(args.output_dir, args.save_total_limit)
    progress = TrainProgress(schedule, tokens_per_step, steps_per_epoch, start_step)
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
        """A checkpoint of `state`, and the model export of `exported` (default: state) as numpy params."""
        progress.check(step)  # never save or export weights a NaN loss came from
        checkpoints.save(step, state, meta if best is None else best.checkpoint_meta(meta))
        if jax.process_index() == 0:
            export(parallel.fetch(state.params) if exported is None else exported)
        if hub is not None:
            hub.push(step)

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
            final = best.restore(state, mesh)
        eval_metrics = best.results()
    save(exported=parallel.fetch(final.params))  # the checkpoint holds the last state, the export the final model
    checkpoints.wait()
    checkpoints.close()
    writer.close()
    return final, train_metrics, eval_metrics

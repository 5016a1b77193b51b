"""The training loop every script shares: steps, logging, evaluation and saving at their cadences.

The task-specific parts come in as arguments: the compiled per-device step, the host batches, an `evaluate(state)`
and an `export(params)` that writes the Hugging Face model.
"""

import logging
import time

import jax
from tqdm.auto import tqdm

from flaxtrain import checkpoint, parallel
from flaxtrain.logging import MetricsWriter, TrainProgress, clear_results

logger = logging.getLogger(__name__)


def as_scalars(prefix: str, metrics: dict) -> dict:
    """{"eval_loss": x} -> {"eval/loss": x}: results-file names to TensorBoard tags."""
    return {f"{prefix}/{k.removeprefix(prefix + '_')}": v for k, v in metrics.items() if isinstance(v, (int, float))}


def train(state, p_train_step, batches, *, args, mesh, rows: int, total_steps: int, steps_per_epoch: int,
          start_step: int, schedule, tokens_per_step: int, evaluate, export, meta: dict):
    """Runs `p_train_step(state, batch, dropout_rng)` on `batches` (host dicts of this host's rows, from
    `start_step` on) until `total_steps`; logs every --logging_steps, evaluates every --eval_steps (when
    `evaluate` is given), saves a checkpoint and the exported model every --save_steps and at the end, then
    evaluates once more. Returns (state, train metrics, final eval metrics or None)."""
    clear_results(args.output_dir)
    writer = MetricsWriter(args.output_dir, start_step)
    checkpoints = checkpoint.Checkpoints(args.output_dir, args.save_total_limit)
    progress = TrainProgress(schedule, tokens_per_step, steps_per_epoch, start_step)
    bar = tqdm(total=total_steps, initial=start_step, desc="training", disable=jax.process_index() != 0)
    dropout_rng = jax.random.key(args.seed + 1)  # the step folds its step number in
    started, step, record = time.perf_counter(), start_step, {}

    def save():
        checkpoints.save(step, state, meta)
        if jax.process_index() == 0:
            export(parallel.fetch(state.params))

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
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/learning_rate']:.2e}")
        if evaluate and step % args.eval_steps == 0 and step < total_steps:
            eval_metrics = evaluate(state)
            writer.write(step, as_scalars("eval", eval_metrics))
            logger.info("step %d: %s", step, eval_metrics)
        if step % args.save_steps == 0 or step == total_steps:
            save()
    bar.close()
    if step < total_steps:
        raise RuntimeError(f"The training data ran out at step {step} of {total_steps}.")
    checkpoints.wait()
    checkpoints.close()
    train_metrics = {"train_loss": record.get("train/loss"), "train_runtime": time.perf_counter() - started,
                     "train_steps": total_steps, "epoch": step / steps_per_epoch}
    eval_metrics = None
    if evaluate:
        eval_metrics = evaluate(state)
        writer.write(step, as_scalars("eval", eval_metrics))
    writer.close()
    return state, train_metrics, eval_metrics

"""Optimizer, schedule, train state and the small numerical pieces every train step shares."""

import logging
import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

TrainState = train_state.TrainState


def plan_steps(num_examples: int, global_batch: int, max_steps: int = -1,
               num_train_epochs: float = 3.0) -> tuple[int, int]:
    """Returns (steps_per_epoch, total_steps) for `global_batch` examples per optimizer update.

    `max_steps` > 0 overrides `num_train_epochs`; a fractional number of epochs is honoured.
    """
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"The training set has {num_examples} examples, fewer than one global batch of {global_batch} "
            f"(per_device_train_batch_size x {jax.device_count()} devices x gradient_accumulation_steps). "
            "Use a smaller batch or more data."
        )
    total = max_steps if max_steps > 0 else math.ceil(steps_per_epoch * num_train_epochs)
    if total < 1:
        raise ValueError("Nothing to train: --num_train_epochs and --max_steps give zero steps.")
    return steps_per_epoch, total


def plan(optimization, train_examples: Optional[int], do_train: bool = True):
    """(steps_per_epoch, total_steps, schedule, optimizer) of a run (a settings.Optimization). Without training:
    an identity optimizer (evaluation or prediction only); train_examples None: a stream, whose length
    max_steps gives."""
    o = optimization
    if not do_train:
        return 0, 0, None, optax.identity()
    if train_examples is None:
        if o.max_steps <= 0:
            raise ValueError("--streaming needs --max_steps: a stream has no length to count epochs in.")
        steps_per_epoch = total_steps = o.max_steps
    else:
        steps_per_epoch, total_steps = plan_steps(train_examples, o.update_batch, o.max_steps, o.num_train_epochs)
    warmup = o.warmup_steps or int(o.warmup_ratio * total_steps)
    schedule = make_schedule(o.learning_rate, total_steps, warmup, o.lr_scheduler_type)
    tx = make_optimizer(schedule, adafactor=o.adafactor, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_epsilon,
                        weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm)
    return steps_per_epoch, total_steps, schedule, tx


def make_schedule(peak: float, total_steps: int, warmup_steps: int = 0, kind: str = "linear") -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then `kind`: linear or cosine decay to 0, or constant."""
    warmup = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if kind == "linear":
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay applies to matrices (Dense kernels and embeddings), never to biases and norm scales.

    Decided by the kind of parameter rather than by module names, so it holds for every model family (a
    scanned LayerNorm scale is 2-D, so the rank alone would not tell). The name is the path's last dict key (flax's
    boxes of logical axis names add a `.value` after it).
    """
    def decayed(path, _):
        return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(schedule, *, adafactor: bool = False, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW (no decay on biases and norms, see decay_mask) or Adafactor, after global-norm clipping (0: none)."""
    if adafactor:
        if weight_decay:
            logging.getLogger(__name__).warning("--weight_decay is not applied with --adafactor (as in the original).")
        opt = optax.adafactor(learning_rate=schedule)
    else:
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm and max_grad_norm > 0:
        opt = optax.chain(clip_by_global_norm(max_grad_norm), opt)
    return opt


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's clipping (and its empty state, so checkpoints are alike), as one multiplication
    by a scalar: optax's `select(norm < max, g, g / norm * max)` holds a division, which XLA will not repeat in each
    consumer of the clipped gradients (Adam's two moments), so it writes them out and reads them back: on a CPU a
    gpt2-small step read 2.5 GB more memory than without clipping, and 0.5 GB more (the norm) this way."""
    def update(updates, state, params=None):
        del params
        factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))  # norm 0: max / 0 = inf, factor 1
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.clip_by_global_norm(max_norm).init, update)


def accumulate_gradients(loss_fn, params, batch: dict, rng, steps: int):
    """Sums gradients of `loss_fn(params, micro_batch, rng) -> (loss, aux)` over `steps` micro-batches.

    The global batch [steps * b, ...] is split into `steps` micro-batches of b rows run one after another (a
    `lax.scan`), so memory is that of one micro-batch. Micro-batch i takes every steps-th row from row i, so that
    each device holds b / devices rows of every micro-batch (the batch is split over the devices in blocks of
    rows). Returns (grads, summed aux).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if steps == 1:
        return grad_fn(params, batch, rng)
    micro = jax.tree.map(lambda x: jnp.moveaxis(x.reshape((x.shape[0] // steps, steps) + x.shape[1:]), 1, 0), batch)

    def body(carry, inputs):
        i, mb = inputs
        grads, aux = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (grads, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, rng))
    (grads, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(steps), micro))
    return grads, aux


def cross_entropy_sums(logits, labels, weights, label_smoothing: float = 0.0):
    """Token-weighted cross-entropy and accuracy as sums, to be normalised by the total weight.

    logits: [..., V]; labels, weights: [...] (weights 0 where a position is not a target).
    Returns (loss_sum, correct_sum, weight_sum), all float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets)
    else:  # no [.., V] one-hot in memory
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels)
    weights = weights.astype(jnp.float32)
    return (loss * weights).sum(), (correct * weights).sum(), weights.sum()

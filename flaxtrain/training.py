"""Optimizer, schedule, train state and the small numerical pieces every train step shares."""

import logging
import math

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

TrainState = train_state.TrainState


def plan_steps(num_examples: int, global_batch: int, args) -> tuple[int, int]:
    """Returns (steps_per_epoch, total_steps) for `global_batch` examples per optimizer update.

    `--max_steps` overrides `--num_train_epochs`; a fractional number of epochs is honoured.
    """
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"The training set has {num_examples} examples, fewer than one global batch of {global_batch} "
            f"(per_device_train_batch_size x {jax.device_count()} devices x gradient_accumulation_steps). "
            "Use a smaller batch or more data."
        )
    total = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.num_train_epochs)
    if total < 1:
        raise ValueError("Nothing to train: --num_train_epochs and --max_steps give zero steps.")
    return steps_per_epoch, total


def plan(args, train_examples, update_batch: int):
    """(steps_per_epoch, total_steps, schedule, optimizer) of a run. Without --do_train: an identity optimizer
    (evaluation or prediction only); train_examples None: a stream, whose length --max_steps gives."""
    if not args.do_train:
        return 0, 0, None, optax.identity()
    if train_examples is None:
        steps_per_epoch = total_steps = args.max_steps
    else:
        steps_per_epoch, total_steps = plan_steps(train_examples, update_batch, args)
    schedule = make_schedule(args, total_steps)
    return steps_per_epoch, total_steps, schedule, make_optimizer(args, schedule)


def make_schedule(args, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak rate, then linear or cosine decay to 0 (or constant)."""
    warmup = args.warmup_steps or int(args.warmup_ratio * total_steps)
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if args.lr_scheduler_type == "linear":
        decay = optax.linear_schedule(args.learning_rate, 0.0, decay_steps)
    elif args.lr_scheduler_type == "cosine":
        decay = optax.cosine_decay_schedule(args.learning_rate, decay_steps)
    else:
        decay = optax.constant_schedule(args.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, args.learning_rate, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay applies to matrices (Dense kernels and embeddings), never to biases and norm scales.

    Decided by the kind of parameter rather than by module names, so it holds for every model family (a
    scanned LayerNorm scale is 2-D, so the rank alone would not tell).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(args, schedule: optax.Schedule) -> optax.GradientTransformation:
    if args.adafactor:
        if args.weight_decay:
            logging.getLogger(__name__).warning("--weight_decay is not applied with --adafactor (as in the original).")
        opt = optax.adafactor(learning_rate=schedule)
    else:
        opt = optax.adamw(schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                          weight_decay=args.weight_decay, mask=decay_mask)
    if args.max_grad_norm and args.max_grad_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), opt)
    return opt


def accumulate_gradients(loss_fn, params, batch: dict, rng, steps: int):
    """Sums gradients of `loss_fn(params, micro_batch, rng) -> (loss, aux)` over `steps` micro-batches.

    The per-device batch [steps * b, ...] is split into `steps` micro-batches of b rows run one after another
    (a `lax.scan`), so memory is that of one micro-batch. Returns (grads, summed aux).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if steps == 1:
        return grad_fn(params, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape((steps, x.shape[0] // steps) + x.shape[1:]), batch)

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

"""Logical axis names on parameters, given where the models create them (flax's nn.with_logical_partitioning, as
MaxText and flax's lm1b do). `flaxtrain.parallel.RULES` maps the names onto the mesh.

    EMBED  the model width D          MLP    the MLP's inner width F      HEADS  attention heads (N, or N * H)
    KV     the head size H            VOCAB  the vocabulary V             NORM   a layer norm's [D] params
    POSITIONS  learned positions      BUCKETS  relative-position buckets  CLASSES  a classifier's labels
    LAYERS  the stacked layers of nn.scan (added by models/stack.py)

A Dense kernel [in, out] names both its dimensions, e.g. (EMBED, HEADS) for a query projection, (HEADS, EMBED) for
the attention output, (EMBED, MLP) and (MLP, EMBED) for the MLP; its bias takes the output's name.
"""

import flax.linen as nn

EMBED, MLP, HEADS, KV, VOCAB, NORM = "embed", "mlp", "heads", "kv", "vocab", "norm"
POSITIONS, BUCKETS, CLASSES, LAYERS = "positions", "buckets", "classes", "layers"


def named(init, *names: str | None):
    """`init` whose parameter carries the logical axis `names`, one per dimension."""
    return nn.with_logical_partitioning(init, names)


def dense_inits(std: float, names: tuple) -> dict:
    """kernel_init (normal(std)) and bias_init (zeros) of an nn.Dense whose kernel has the logical `names`."""
    return {"kernel_init": named(nn.initializers.normal(std), *names),
            "bias_init": named(nn.initializers.zeros_init(), names[-1])}


def norm_inits() -> dict:
    """scale_init and bias_init of a LayerNorm (or an RMSNorm's scale) over the model width."""
    return {"scale_init": named(nn.initializers.ones_init(), NORM),
            "bias_init": named(nn.initializers.zeros_init(), NORM)}


def embedding_init(std: float, names: tuple = (VOCAB, EMBED)):
    return named(nn.initializers.normal(std), *names)

"""Layers stacked by nn.scan, the way every family here builds its encoder or decoder."""

import flax.linen as nn
import jax

from flaxtrain.models.partitioning import LAYERS
from flaxtrain.parallel import split_residual


def _batch_split_input(layer: type[nn.Module]) -> type[nn.Module]:
    """`layer` whose input x [B, T, ...] (the scan's carry) stays split over the batch axes of the mesh, and its
    positions over the tensor axis (parallel.split_residual): one constraint per layer keeps XLA from splitting
    activations like the weights, and what the backward pass keeps of every layer shrinks with --tensor_parallel."""
    class BatchSplit(layer):
        def __call__(self, x, *args):
            return super().__call__(split_residual(x), *args)

    BatchSplit.__name__ = layer.__name__  # (flax names nothing after the class, but logs and errors do)
    return BatchSplit


def scan_layers(layer: type[nn.Module], num_layers: int, gradient_checkpointing: bool,
                in_axes=(nn.broadcast,), keep_only_products: bool = True) -> type[nn.Module]:
    """`layer` applied num_layers times by nn.scan ((carry, *inputs) -> (carry, output)): its params stacked
    [L, ...] (the new axis named LAYERS for the sharding rules), each layer with its own dropout rng, `in_axes`
    saying which inputs are the same for every layer (nn.broadcast) and which are sliced per layer (0, e.g. a
    per-layer cache). Rematerialised in the backward pass if gradient_checkpointing: inside scan XLA cannot CSE the
    recomputation away, so prevent_cse's barriers would only cost speed (jax.checkpoint's docs: unnecessary under
    scan). Otherwise, on a CPU and if keep_only_products, the backward pass keeps only the layers' matrix products
    and recomputes the rest (norms, activations, softmax, dropout masks): fewer stacked [L, ...] buffers to fill,
    write and read back, and a step 1.15x faster for gpt2-small, 1.05x for bert-base, as fast for bart-small as its
    layers unrolled in a Python loop, which compiled 1.7x longer (T5's is 3% slower so: T5 keeps everything;
    benchmarks/README.md); on an accelerator XLA keeps what it keeps until that is measured there
    (tests/test_stack.py: the same values)."""
    layer = _batch_split_input(layer)
    if gradient_checkpointing:
        layer = nn.remat(layer, prevent_cse=False)
    elif keep_only_products and jax.default_backend() == "cpu":
        layer = nn.remat(layer, prevent_cse=False, policy=jax.checkpoint_policies.checkpoint_dots)
    return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=in_axes, length=num_layers, metadata_params={nn.PARTITION_NAME: LAYERS})


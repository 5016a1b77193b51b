"""Data parallelism, pmap-style, on a mesh of every device of every host.

The train and eval steps are per-device code that reduces over the mesh axis "batch" with `jax.lax.psum` /
`pmean`, exactly as under `jax.pmap`. `data_parallel` compiles such a function with `jax.jit(jax.shard_map(...))`,
which is what `jax.pmap` itself is built on today. Each host builds only its own rows of every global batch and
`to_global` assembles the global array from them.
"""

import functools
import os

import jax
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: no public spelling yet
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "batch"


def initialize_distributed():
    """Joins a multi-host job. JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID name it
    explicitly; otherwise JAX detects TPU pods, Slurm and Open MPI jobs itself, and a lone host needs nothing."""
    if jax.distributed.is_initialized() or xla_bridge.backends_are_initialized():
        return  # joined already, or JAX already runs on this host alone (main() called again in one process)
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not.")
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return
    try:
        jax.distributed.initialize()
    except ValueError:  # "coordinator_address should be defined": no cluster around, a single host
        pass


def make_mesh():
    """A one-axis mesh named "batch" over all devices of all hosts, each host's devices next to each other.

    (jax.make_mesh would order TPU devices by their place in the torus, interleaving hosts; a data-parallel psum
    does not care about the order, and contiguous blocks let each host feed one slice of every batch.)"""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.array(devices), (AXIS,))


def replicate(tree, mesh):
    """Puts every leaf of `tree` on every device (what `flax.jax_utils.replicate` did for pmap)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=None)  # asked for every batch; the answer depends only on the mesh and the size
def local_rows(mesh, global_rows: int) -> slice:
    """The rows of a global batch of `global_rows` that this host feeds: its devices' contiguous block."""
    sharding = NamedSharding(mesh, P(AXIS))
    index_map = sharding.addressable_devices_indices_map((global_rows,))
    starts = sorted(idx[0].start or 0 for idx in index_map.values())
    stops = sorted(idx[0].stop if idx[0].stop is not None else global_rows for idx in index_map.values())
    if stops[-1] - starts[0] != sum(b - a for a, b in zip(starts, stops)):
        raise RuntimeError("this host's devices do not hold a contiguous block of the batch")
    return slice(starts[0], stops[-1])


def to_global(host_batch: dict, mesh, global_rows: int) -> dict:
    """Assembles the global batch from this host's rows (`host_batch` arrays have `local_rows` rows)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
        for k, v in host_batch.items()
    }


def data_parallel(step_fn, mesh, batch_args=(1,), donate_argnums=()):
    """Compiles per-device `step_fn` over the mesh.

    Arguments whose positions are in `batch_args` are split along their leading axis over the devices; all other
    arguments and all outputs are replicated, so the step must reduce its outputs over AXIS (psum/pmean).
    """

    def compiled(*args):
        in_specs = tuple(P(AXIS) if i in batch_args else P() for i in range(len(args)))
        return jax.shard_map(step_fn, mesh=mesh, in_specs=in_specs, out_specs=P())(*args)

    return jax.jit(compiled, donate_argnums=donate_argnums)


def fetch(tree):
    """Replicated device values as numpy, on every host (no cross-host gather needed)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def gather_rows(x):
    """Inside a data-parallel step: the rows of `x` from every device, in global batch order, replicated.

    (An all_gather would do, but shard_map cannot tell that its result is the same on every device; a psum of
    each device's rows placed at its offset in zeros can, and costs as little at evaluation sizes.)"""
    rows, index = x.shape[0], jax.lax.axis_index(AXIS)
    placed = jax.lax.dynamic_update_slice_in_dim(
        jax.numpy.zeros((rows * jax.lax.axis_size(AXIS), *x.shape[1:]), x.dtype), x, index * rows, axis=0)
    return jax.lax.psum(placed, AXIS)

"""One mesh over every device of every host, with named axes, and the shardings the steps are compiled with.

Axes: `data` (replicas), `fsdp` (parameters and optimizer state are split over it, and the batch too) and `tensor`
(each layer's heads and MLP split over it). The batch is split over data x fsdp. Parameters carry logical axis names
where the models create them (embed, mlp, heads, kv, vocab, layers, ...: `flaxtrain/models/partitioning.py`);
`RULES` maps each logical name to the mesh axes that may split it, in order of preference, and `spec_for` gives each
dimension the axes (of size > 1, not taken by another dimension) that divide it. A dimension that none divides stays
whole, with a log line. The train and eval steps are plain functions of global arrays: jax.jit with these shardings
lets XLA insert the collectives (the all-gathers of split weights, the reductions over the batch), as MaxText,
levanter and big_vision do. With --fsdp 1 and --tensor_parallel 1 it is data parallelism, as the original's pmap.

Each host builds only its rows of every global batch (`host_rows`) and `to_global` assembles the global arrays.
"""

import functools
import json
import logging
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: no public spelling yet
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
# Logical axis -> mesh axes that may split it, in order of preference. FSDP splits every large dimension the
# tensor axis leaves whole, so that with --fsdp N each parameter and its optimizer state take 1/N of the memory.
RULES = {
    "embed": ("fsdp",),             # the model width D
    "mlp": ("tensor", "fsdp"),       # the MLP's inner width F
    "heads": ("tensor", "fsdp"),     # attention heads (N, or N * head size)
    "kv": (),                        # head size H
    "vocab": ("tensor", "fsdp"),     # the vocabulary V
    "norm": ("fsdp",),               # layer norm scales and biases [D]
    "positions": (),                 # learned position embeddings' rows
    "buckets": ("fsdp",),            # T5's relative-position buckets
    "layers": (),                    # the stacked layers of nn.scan
    "classes": (),                   # a classifier's labels
}


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


def mesh_shape(devices: int, fsdp: int = 1, tensor_parallel: int = 1) -> dict:
    """{"data": ..., "fsdp": ..., "tensor": ...} for `devices` devices; fsdp -1 takes what tensor leaves."""
    if tensor_parallel < 1 or devices % tensor_parallel:
        raise ValueError(f"--tensor_parallel={tensor_parallel} does not divide the {devices} devices.")
    if fsdp == -1:
        fsdp = devices // tensor_parallel
    if fsdp < 1 or devices % (fsdp * tensor_parallel):
        raise ValueError(f"--fsdp={fsdp} x --tensor_parallel={tensor_parallel} does not divide the {devices} "
                         "devices.")
    return {"data": devices // (fsdp * tensor_parallel), "fsdp": fsdp, "tensor": tensor_parallel}


def make_mesh(fsdp: int = 1, tensor_parallel: int = 1) -> Mesh:
    """The mesh (data, fsdp, tensor) over every device of every host. On one host the devices are laid out by
    their topology (mesh_utils); on several, `tensor` and then `fsdp` stay inside a host as far as they fit, and the
    rest spans hosts (the slower network carries the data-parallel and the outer FSDP traffic)."""
    shape = mesh_shape(jax.device_count(), fsdp, tensor_parallel)
    sizes = [shape[axis] for axis in AXES]
    if jax.process_count() == 1:
        devices = mesh_utils.create_device_mesh(sizes, jax.devices())
    else:
        inside, local = [], jax.local_device_count()
        for size in reversed(sizes):  # tensor first, then fsdp, then data
            inside.insert(0, math.gcd(size, local))
            local //= inside[0]
        across = [size // part for size, part in zip(sizes, inside)]
        devices = mesh_utils.create_hybrid_device_mesh(inside, across, jax.devices(), process_is_granule=True)
    return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def load_rules(overrides: str | None) -> dict:
    """RULES with --logical_axis_rules (JSON, e.g. '{"embed": ["fsdp"], "mlp": ["tensor"]}') applied."""
    rules = dict(RULES)
    if overrides:
        try:
            parsed = json.loads(overrides)
        except ValueError as e:
            raise ValueError(f"--logical_axis_rules is not JSON: {e}") from None
        for name, axes in parsed.items():
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if not set(axes) <= set(AXES):
                raise ValueError(f"--logical_axis_rules: {name!r} -> {axes}: the mesh axes are {AXES}")
            rules[name] = axes
    return rules


def spec_for(names, shape, mesh: Mesh, rules: dict, dropped: set | None = None) -> P:
    """The mesh PartitionSpec of an array of `shape` whose dimensions have the logical `names`. Every dimension
    takes its first choice of axis before any takes a second one (so a [heads, embed] kernel gets tensor on heads
    and fsdp on embed); an axis is taken if it is larger than 1, unused by another dimension, and divides what is
    left of the dimension. What a dimension could not take is added to `dropped` as (name, size, axis), for the log."""
    if names is None or len(names) != len(shape):  # unannotated, or an optimizer state of another rank
        return P()
    choices = [rules.get(name, ()) if name else () for name in names]
    taken, used = [[] for _ in shape], set()
    for rank in range(max(map(len, choices), default=0)):
        for axes, size, name, mine in zip(choices, shape, names, taken):
            if rank >= len(axes) or axes[rank] in used or mesh.shape[axes[rank]] == 1:
                continue
            axis = axes[rank]
            if size % (math.prod(mesh.shape[a] for a in mine) * mesh.shape[axis]):
                if dropped is not None:
                    dropped.add((name, size, axis))
                continue
            mine.append(axis)
            used.add(axis)
    return P(*(None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in taken))


def shardings(boxed_tree, mesh: Mesh, rules: dict) -> object:
    """NamedShardings for the (unboxed) tree of `boxed_tree`, an abstract tree whose leaves flax's
    nn.with_logical_partitioning boxed with logical names (params, or a TrainState built from them)."""
    dropped = set()

    def one(leaf):
        names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
        return NamedSharding(mesh, spec_for(names, nn.unbox(leaf).shape, mesh, rules, dropped))

    result = jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for name, size, axis in sorted(dropped):
        logger.info("A %s dimension of %d does not divide over %s (%d): kept whole there", name, size, axis,
                    mesh.shape[axis])
    return result


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH))


def replicate(tree, mesh: Mesh):
    """Puts every leaf of `tree` whole on every device (of this host's mesh)."""
    return jax.device_put(tree, replicated(mesh))


def on_every_device(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array, the same on every host, as one global array whole on every device."""
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def _rows_by_host(mesh: Mesh, global_rows: int) -> dict[int, frozenset]:
    """{process index: the rows of a global batch of `global_rows` that its devices hold}, from the mesh alone."""
    rows = {}
    for device, index in batch_sharding(mesh).devices_indices_map((global_rows,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(global_rows)))
    return {process: frozenset(held) for process, held in rows.items()}


@functools.lru_cache(maxsize=None)  # asked for every batch; the answer depends only on the mesh and the size
def host_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """The rows of a global batch of `global_rows` that this host's devices hold, in order (int array)."""
    return np.array(sorted(_rows_by_host(mesh, global_rows)[jax.process_index()]))


@functools.lru_cache(maxsize=None)
def host_share(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """(index, count): which of the distinct row sets of a global batch this host holds, and how many there are.
    A stream is read in `count` shares, this host's being `index`: hosts holding the same rows (replicas along
    `tensor`) read the same share. Computed from the mesh alone, the same on every host."""
    by_host = _rows_by_host(mesh, global_rows)
    shares = sorted(set(by_host.values()), key=min)
    if sum(map(len, shares)) != global_rows:  # (the batch axes split the rows; any host holds all of a part or none)
        raise ValueError(f"The hosts' rows of a global batch overlap in part: {shares}")
    return shares.index(by_host[jax.process_index()]), len(shares)


def all_hosts_have(mine: bool, what: str):
    """Raises on every host (the same message) unless every host has `mine` True: a check that must not leave
    some hosts waiting in a collective for others that stopped. `what` says what a host lacks."""
    have = host_values(int(mine))
    if have.all():
        return
    if len(have) == 1:
        raise ValueError(f"This host has {what}.")
    raise ValueError(f"Host(s) {', '.join(map(str, np.flatnonzero(have == 0)))} of {len(have)} have {what}.")


def host_values(values) -> np.ndarray:
    """Every host's `values` (ints), stacked [hosts, ...] in process order, the same on every host."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def same_on_every_host(text: str) -> str:
    """Process 0's `text` on every process (a decision process 0 made alone: a refusal, a Hub repo id)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    raw = np.zeros(2048, np.uint8)
    encoded = text.encode()[:2048]
    raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).rstrip(b"\0").decode()


def agree_max(value: int) -> int:
    """The largest of every host's `value` (the same answer on every host)."""
    return int(host_values(value).max())


def to_global(host_batch: dict, mesh: Mesh, global_rows: int) -> dict:
    """The global batch from this host's rows (`host_batch` arrays hold the rows `host_rows` lists, in order)."""
    rows, sharding = host_rows(mesh, global_rows), batch_sharding(mesh)

    def assemble(local):
        def shard(index):  # a device's slice of the global rows -> the same rows of `local`
            start, stop, _ = index[0].indices(global_rows)
            first = np.searchsorted(rows, start)
            return local[first:first + stop - start]
        return jax.make_array_from_callback((global_rows, *local.shape[1:]), sharding, shard)

    return {k: assemble(np.asarray(v)) for k, v in host_batch.items()}


def split_batch(x):
    """Inside a step compiled under a mesh (StateLayout's steps): keeps x [B, ...] split over the batch axes and
    whole along its other dimensions. Placed between layers, this is what makes FSDP FSDP: XLA then gathers each
    layer's split weights rather than the activations (with --tensor_parallel, the layer's output is all-reduced
    there, as Megatron does). Outside a mesh, or for a batch the axes do not divide, x as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH) <= set(mesh.axis_names):
        return x
    ways = math.prod(mesh.shape[axis] for axis in BATCH)
    if ways == 1 or x.shape[0] % ways:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH))


def split_residual(x):
    """Inside a step compiled under a mesh: the residual stream x [B, T, ...] between two layers, its rows split over
    the batch axes (split_batch) and, with --tensor_parallel, its positions split over the tensor axis: sequence
    parallelism (Megatron-LM's, MaxText's), so that what a device keeps of every layer's input for the backward pass
    shrinks by the tensor degree. XLA then gathers the positions where a layer's heads or MLP need all of them, and
    reduce-scatters the layer's output (where it all-reduced it). Outside a mesh, without a tensor axis, or for a
    length the axis does not divide (decoding one token): split_batch(x)."""
    x = split_batch(x)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1 or x.ndim < 3:
        return x
    if x.shape[1] % mesh.shape["tensor"]:
        return x
    ways = math.prod(mesh.shape[axis] for axis in BATCH)
    rows = BATCH if ways > 1 and x.shape[0] % ways == 0 else None
    return jax.lax.with_sharding_constraint(x, P(rows, "tensor"))


class _UnderMesh:
    """A jitted function traced with the mesh in context (so that split_batch sees it): calling it, or lowering it
    for a memory plan."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


MATRICES = ("kernel", "embedding")  # the param names of Dense kernels and embedding tables: the bulk of the bytes


def in_compute_dtype(params, dtype, params_shardings):
    """`params` with every matrix (MATRICES) cast to the computation `dtype` where its shard lies, pinned there
    before XLA gathers it for a layer (MaxText's way): the gathered copies and those a rematerialised layer
    recomputes from are bfloat16 under --dtype bfloat16 (llama-70b on a TPU v5e-256 plan: 1 GiB less a device,
    benchmarks/README.md). The layers cast their matrices to `dtype` anyway, so the forward values are the same;
    the gradients come back through the cast, reduced over the devices in `dtype` before they become float32 (the
    params and optimizer state stay float32). Norm scales and biases (small, some used in float32) stay as they
    are; with a float32 `dtype`, `params` as they are."""
    if jax.numpy.dtype(dtype) == jax.numpy.float32:
        return params

    def cast(path, x, sharding):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names[-1] not in MATRICES or x.dtype == dtype:
            return x
        return jax.lax.with_sharding_constraint(x.astype(dtype), sharding)

    return jax.tree_util.tree_map_with_path(cast, params, params_shardings)


class StateLayout:
    """Where a model's params and TrainState live on the mesh (shardings from their logical axis names), and the
    steps compiled for them. `init_params(model, rng, unbox=...)` is the family's init (models/*.py)."""

    def __init__(self, model, init_params, tx, mesh: Mesh, rules: dict):
        from flaxtrain.training import TrainState

        def apply(variables, *args, **kwargs):  # the model, its matrices cast (where they lie) to its dtype
            params = in_compute_dtype(variables["params"], getattr(model, "dtype", jax.numpy.float32), self.params)
            return model.apply({**variables, "params": params}, *args, **kwargs)

        def create(params):
            return TrainState.create(apply_fn=apply, params=params, tx=tx)

        boxed = jax.eval_shape(functools.partial(init_params, model, unbox=False), jax.random.key(0))
        self.mesh, self.params = mesh, shardings(boxed, mesh, rules)
        self.state = shardings(jax.eval_shape(create, boxed), mesh, rules)
        self._abstract = jax.eval_shape(create, nn.unbox(boxed))
        self._init = jax.jit(functools.partial(init_params, model), out_shardings=self.params)
        self._create = jax.jit(create, out_shardings=self.state, donate_argnums=0)
        self._by_path = {tuple(k.key for k in path): sharding for path, sharding
                         in jax.tree_util.tree_flatten_with_path(self.params)[0]}

    def init(self, rng):
        """Fresh params, each device computing only its shards."""
        return self._init(rng)

    def create(self, params):
        """The TrainState of `params` (consumed), the optimizer state born split like the params."""
        return self._create(params)

    def abstract_state(self):
        """The TrainState's shapes, dtypes and shardings, allocating nothing (what a checkpoint restores into)."""
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self._abstract,
                            self.state)

    def place(self, path: tuple, array: np.ndarray) -> jax.Array:
        """One params leaf from the host onto the devices, each device taking only its shard (for loading)."""
        return jax.make_array_from_callback(array.shape, self._by_path[path], lambda index: array[index])

    def train_step(self, step):
        """`step(state, batch, rng) -> (state, metrics)` compiled for the mesh; the state is donated."""
        return _UnderMesh(jax.jit(step, in_shardings=(self.state, batch_sharding(self.mesh), replicated(self.mesh)),
                                  out_shardings=(self.state, replicated(self.mesh)), donate_argnums=(0,)), self.mesh)

    def eval_step(self, step):
        """`step(state, batch) -> outputs` compiled for the mesh; the outputs come back whole on every host."""
        return _UnderMesh(jax.jit(step, in_shardings=(self.state, batch_sharding(self.mesh)),
                                  out_shardings=replicated(self.mesh)), self.mesh)

    def params_step(self, step, batch_args: int = 1):
        """`step(params, *batch arrays) -> outputs` (e.g. generation) compiled for the mesh; outputs whole."""
        batch = (batch_sharding(self.mesh),) * batch_args
        return _UnderMesh(jax.jit(step, in_shardings=(self.params, *batch), out_shardings=replicated(self.mesh)),
                          self.mesh)


def fetch(tree):
    """Device values as numpy on every host: replicated or fully addressable arrays directly, arrays split across
    hosts gathered (a collective: every host must call it)."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)

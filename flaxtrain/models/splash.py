"""Pallas splash attention on a TPU: FLAXTRAIN_ATTENTION=splash (models/attention.py selects it).

Splash attention (jax.experimental.pallas.ops.tpu.splash_attention, MaxText's kernel) is flash attention that
knows the mask's structure: a static mask (causal, a sliding window, or none) that it reads block by block, skipping
the blocks where no query sees a key, and segment ids, where a query sees only keys of its own segment. It never
makes the [B, N, T, S] scores, forward or backward: Llama-2-70B at 2048 tokens saves 1 GiB a row (the memory plans of
benchmarks/README.md).

What it takes here is a `Structure` (the mask said as causal / window / segments, which the families build where
they build the dense mask): padding and packed rows become segments, the padding's own segment 0 included. A
padding query then sees the padding keys, where XLA's dense mask gives it a uniform softmax or the real keys: the
outputs at padding differ, nothing else does (no real query sees a padding key either way, and losses skip
padding). Self-attention only, over a multiple of 128 tokens (the kernel's blocks), with no bias over the logits and
no attention dropout; anything else runs XLA's attention, and `refusal` says why.

Inside a step compiled under a mesh the kernel runs in a shard_map: each device its rows (the batch axes) and, with
--tensor_parallel, its heads (the tensor axis), as MaxText does; the kernel cannot be split by XLA's partitioner.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flaxtrain.parallel import BATCH

# Tests run the kernel in Pallas's interpreter, on any backend: the same kernel code, executed op by op.
INTERPRET = False
BLOCKS = (512, 256, 128)  # the largest that divides the length is each kernel's query and key block
LANES = 128  # the kernel's blocks are multiples of a TPU vector register's 128 lanes


def platform() -> str:
    """Where the step being traced runs: the mesh's devices under a mesh (a TPU pod's when compiling ahead of time
    for one on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def refusal(q, k, bias, structure) -> str | None:
    """Why splash attention cannot take these arguments (None: it can). q [B, T, N, H], k [B, S, K, H]."""
    if not INTERPRET and platform() != "tpu":
        return f"no TPU (the backend is {platform()})"
    if structure is None:
        return "this attention's mask comes without its structure (causal, window, segments), only as booleans"
    if bias is not None:
        return "a bias over the logits (relative positions, ALiBi), for which splash has no place"
    if q.shape[1] != k.shape[1] or q.shape[1] % LANES:
        return f"{q.shape[1]} queries over {k.shape[1]} keys: splash takes self-attention over a multiple of {LANES}"
    return None


def splash_attention(q, k, v, structure, scale: float | None = None, softcap: float | None = None):
    """softmax(cap(scale * q k^T), where the structure's mask) v, q [B, T, N, H], k and v [B, T, K, H] -> [B, T, N, H]
    (grouped-query attention when K < N), with `refusal` None. With several windows, structure.which picks one."""
    q = q * jnp.asarray(q.shape[-1]**-0.5 if scale is None else scale, q.dtype)  # the kernel does not scale
    heads_first = [jnp.swapaxes(x, 1, 2) for x in (q, k, v)]  # [B, N, T, H], the kernel's layout

    def local(q, k, v, segments):  # the rows and heads of one device
        def one_window(window):
            kernel = _kernel(q.shape[1], q.shape[2], structure.causal, window, INTERPRET, softcap)
            return jax.vmap(lambda *x: kernel(*x[:3], segment_ids=_segment_ids(x[3])))(q, k, v, segments)
        if len(structure.windows) == 1:
            return one_window(structure.windows[0])
        return jax.lax.switch(structure.which, [functools.partial(one_window, w) for w in structure.windows])

    rows, heads = _split(q.shape[0], q.shape[2], k.shape[2])
    if rows is None and heads is None:
        out = local(*heads_first, structure.segments)
    else:
        spec = P(rows, heads)
        out = jax.shard_map(local, in_specs=(spec, spec, spec, P(rows)), out_specs=spec, check_vma=False)(
            *heads_first, structure.segments)
    return jnp.swapaxes(out, 1, 2)


def _segment_ids(segments):
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
    return SegmentIds(q=segments, kv=segments)


def _split(batch: int, heads: int, kv_heads: int):
    """(the mesh axes of the rows, of the heads) in the shard_map: the batch axes where they divide the rows, the
    tensor axis where it divides both head counts; (None, None) outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    axes = [a for a in BATCH if a in mesh.axis_names]
    rows = tuple(axes) if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else None
    tensor = mesh.shape.get("tensor", 1)
    split_heads = tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0
    return rows, "tensor" if split_heads else None


def _kernel(heads: int, length: int, causal: bool, window: int | None, interpret: bool, softcap: float | None):
    """The splash kernel of one example's `heads` query heads over `length` tokens. Made in the trace that calls it
    (its block tables become that trace's constants; splash caches the host-side reading of the mask)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    if window is not None:  # causal; transformers' window counts the query itself: W - 1 keys before it
        mask = masks.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    elif causal:
        mask = masks.CausalMask((length, length))
    else:
        mask = masks.FullMask((length, length))
    block = next(b for b in BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


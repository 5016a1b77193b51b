"""Random numbers keyed per example: what an example draws is a function of its key alone.

A host that builds its share of a batch draws for its own rows only, and they come out as any other split of the
batch (one host, 32 hosts, another batch size) would draw them, because nothing is drawn from a generator's
running state. The numbers are counter-based, as JAX's own: element (key, stream, position) is a hash of the three,
vectorized over all of them in numpy. The hash is splitmix64 (Steele, Lea, Flood 2014): each (key, stream) seeds a
splitmix64 sequence whose `position`-th output is the element, so every row is a stretch of a generator that
passes BigCrush.

    keys = example_rng.keys(seed, 2, epoch, indices)   # [n] uint64, one per example
    u = example_rng.uniform(keys, 128, stream=0)        # [n, 128] float64 in [0, 1)
    ids = example_rng.integers(keys, 128, stream=1, high=vocab_size)

Everything stays in uint64 arrays, where numpy wraps on overflow silently (numpy scalars warn).
"""

import numpy as np

_GOLDEN = np.array(0x9E3779B97F4A7C15, np.uint64)  # splitmix64's increment: 2**64 / golden ratio, odd
_M1 = np.array(0xBF58476D1CE4E5B9, np.uint64)
_M2 = np.array(0x94D049BB133111EB, np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (in place; x must be a fresh array)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _as_uint64(part) -> np.ndarray:
    # Negative ints wrap to their two's complement: distinct inputs stay distinct.
    part = np.asarray(part)
    if part.dtype.kind not in "iub":
        raise TypeError(f"example_rng keys are made of integers, got {part.dtype}")
    return part.astype(np.uint64)


def keys(*parts) -> np.ndarray:
    """One 64-bit key per example from integer parts, broadcast together (e.g. `keys(seed, 2, epoch, indices)`
    with `indices` int [n] -> uint64 [n]). Each part is hashed into the running key, so order and count matter:
    keys(1, 2) != keys(2, 1) != keys(1, 2, 0)."""
    arrays = [_as_uint64(part) for part in parts]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    key = np.zeros(shape, np.uint64).reshape(-1)  # flat, never 0-d: 0-d arithmetic gives numpy scalars
    for part in arrays:
        part = np.broadcast_to(part, shape).reshape(-1)
        key = _mix(key ^ _mix(part + _GOLDEN))  # mixing the part first: nearby integers give unrelated keys
    return key.reshape(shape)


def _bits(keys: np.ndarray, length: int, stream: int) -> np.ndarray:
    """uint64 [n, length]: position p of row i is the (p+1)-th output of splitmix64 seeded by (keys[i], stream)."""
    keys = np.asarray(keys)
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise TypeError(f"keys must be uint64 [n] (from example_rng.keys), got {keys.dtype} {keys.shape}")
    start = _mix(keys ^ _mix(_as_uint64([stream]) + _GOLDEN))  # [n]
    steps = np.arange(1, length + 1, dtype=np.uint64) * _GOLDEN  # [length]: splitmix64's Weyl sequence
    return _mix(start[:, None] + steps[None, :])


def uniform(keys: np.ndarray, length: int, stream: int) -> np.ndarray:
    """float64 [n, length] in [0, 1), uniform on a grid of 2**-53, for keys uint64 [n]. `stream` (a small int)
    separates the draws one example needs for different purposes: the same (key, stream) gives the same row."""
    return (_bits(keys, length, stream) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def integers(keys: np.ndarray, length: int, stream: int, high: int) -> np.ndarray:
    """int64 [n, length] uniform in [0, high), for keys uint64 [n] (bias below high / 2**53: none that matters)."""
    draws = np.floor(uniform(keys, length, stream) * high).astype(np.int64)
    return np.minimum(draws, high - 1)  # u * high may round up to high when u is within 2**-53 of 1

"""Exact k-th smallest selection over a list of (possibly sharded) arrays, without sorting them.

Scores are mapped to order-preserving ``uint32`` keys (NaN lowest). A small sample gives a first
bracket; every further pass counts, per leaf, the elements below 16 thresholds spread across the
bracket in one multi-output reduction (XLA keeps it sharded: each device counts its shard, only the
16 counts are summed across devices) and keeps the sub-interval that holds the target rank. After
about 8 passes at most the bracket is one key: the exact answer. Nothing is sorted, concatenated or
gathered except the sample. Ties at the cut are taken in position order; a cut a few ties deep
(float weights often hold a handful of equal values) costs one minimum pass per tie. Inputs under
``SORT_BELOW`` elements in all are simply sorted: one sort is faster there and compiles to a far
smaller program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_K = 16          # thresholds per counting pass
SORT_BELOW = 1 << 16  # fewer elements in all: one sort (smaller program, and faster) instead of counting passes
_SAMPLE = 1 << 14  # total sample size for the first bracket
_U32_MAX = 0xFFFFFFFF
_FEW_TIES = 4  # a tie cut less deep than this is found by minimum passes

KeyFn = Callable[[int, jax.Array], jax.Array]


def ukey(x: jax.Array) -> jax.Array:
    """Order-preserving uint32 key of float scores; NaN maps to 0 (ranked lowest), -0 equals +0."""
    x = jnp.asarray(x)
    x = x.astype(jnp.float32) if x.dtype != jnp.float32 else x
    b = lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    k = jnp.where((b >> 31) == 1, ~b, b | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x), jnp.uint32(0), k)


def from_ukey(k: jax.Array) -> jax.Array:
    """The float32 value of a key from :func:`ukey` (key 0 gives NaN)."""
    b = jnp.where(k >= jnp.uint32(0x80000000), k & jnp.uint32(0x7FFFFFFF), ~k)
    return lax.bitcast_convert_type(b, jnp.float32)


def auto_explicit(fn: Callable, x: jax.Array, out_spec: jax.sharding.PartitionSpec) -> Callable:
    """``fn`` with ``x``'s explicit mesh axes made automatic, its result placed as ``out_spec``.

    The mesh is read from ``x``, so this works with or without ``jax.set_mesh``. Arrays without
    explicit mesh axes get ``fn`` unchanged.
    """
    sharding = jax.typeof(x).sharding
    if all(a is None for a in sharding.spec):
        return fn
    return jax.sharding.auto_axes(fn, out_sharding=jax.sharding.NamedSharding(sharding.mesh, out_spec))


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _count_below(arrays: Sequence[jax.Array], key_fn: KeyFn, ts: jax.Array) -> jax.Array:
    """``[sum(key < t) for t in ts]`` over all arrays, as one multi-output reduction per array."""
    total = jnp.zeros(ts.shape, jnp.int32)
    for i, x in enumerate(arrays):
        k = key_fn(i, x)
        ops = tuple((k < ts[j]).astype(jnp.int32) for j in range(ts.shape[0]))
        counts = lax.reduce(ops, (jnp.int32(0),) * len(ops), _add, tuple(range(k.ndim)))
        total = total + jnp.stack(counts)
    return total


def _narrow(state, ts, counts, r):
    """Keeps the part of the bracket [lo, hi] that holds rank r, given counts of keys below ts."""
    lo, hi, c_lt, c_le = state
    below = counts <= r
    lo = jnp.maximum(lo, jnp.max(jnp.where(below, ts, jnp.uint32(0))))
    c_lt = jnp.maximum(c_lt, jnp.max(jnp.where(below, counts, 0)))
    hi = jnp.minimum(hi, jnp.min(jnp.where(below, jnp.uint32(_U32_MAX), ts - 1)))
    c_le = jnp.minimum(c_le, jnp.min(jnp.where(below, jnp.int32(2**31 - 1), counts)))
    return lo, hi, c_lt, c_le


def _strided(x: jax.Array, *, stride: int, m: int) -> jax.Array:
    return x.reshape(-1)[stride // 2::stride][:m]


def _sample(arrays: Sequence[jax.Array], key_fn: KeyFn, n: int) -> jax.Array:
    parts = []
    for i, x in enumerate(arrays):
        m = max(1, round(_SAMPLE * x.size / n))
        stride = max(1, x.size // m)
        # Explicit mesh axes: let XLA partition the strided read; only the sample is replicated.
        take = auto_explicit(functools.partial(_strided, stride=stride, m=m), x, jax.P())
        parts.append(key_fn(i, take(x)))
    return jnp.sort(jnp.concatenate(parts))


def kth_smallest(arrays: Sequence[jax.Array], r: jax.Array, key_fn: KeyFn) -> tuple[jax.Array, ...]:
    """Key of rank ``r`` (0-based) among all keys ``key_fn(i, arrays[i])``, with tie counts.

    ``key_fn`` must be elementwise (it is also applied to a sample of each array).

    Returns:
      ``(t, c_lt, c_le)``: the key, how many keys are ``< t`` and how many are ``<= t``.
    """
    n = sum(int(x.size) for x in arrays)
    if n >= 2**31:
        raise ValueError(f"selection over {n} elements exceeds the int32 count range")
    r = jnp.clip(jnp.asarray(r, jnp.int32), 0, n - 1)
    if n < SORT_BELOW:
        return _sorted_kth(arrays, r, key_fn)
    state = (jnp.uint32(0), jnp.uint32(_U32_MAX), jnp.int32(0), jnp.int32(n))
    # First bracket: sample quantiles around the target rank, +-4 standard deviations.
    sample = _sample(arrays, key_fn, n)
    m = sample.shape[0]
    q = r.astype(jnp.float32) / n
    sd = jnp.sqrt(m * q * (1 - q)) + 1
    pos = jnp.clip(jnp.round(q * m + sd * jnp.linspace(-4.0, 4.0, _K)), 0, m - 1).astype(jnp.int32)
    ts = sample[pos]
    state = _narrow(state, ts, _count_below(arrays, key_fn, ts), r)

    def body(state):
        lo, hi = state[0], state[1]
        span = hi - lo
        j = jnp.arange(1, _K + 1, dtype=jnp.uint32)
        ts = lo + (span // (_K + 1)) * j + jnp.minimum(j, span % (_K + 1))
        return _narrow(state, ts, _count_below(arrays, key_fn, ts), r)

    lo, _, c_lt, c_le = lax.while_loop(lambda s: s[0] < s[1], body, state)
    return lo, c_lt, c_le


def _sorted_kth(arrays: Sequence[jax.Array], r: jax.Array, key_fn: KeyFn) -> tuple[jax.Array, ...]:
    """:func:`kth_smallest` by sorting all keys (replicated: only for small inputs)."""
    # Flattening keeps row-major positions, so positional keys (flat_index) see the same order.
    flat = [key_fn(i, auto_explicit(lambda x: x.reshape(-1), x, jax.P())(x)) for i, x in enumerate(arrays)]
    keys = jnp.sort(jnp.concatenate(flat))
    t = keys[r]
    return t, jnp.searchsorted(keys, t, "left").astype(jnp.int32), jnp.searchsorted(keys, t, "right").astype(jnp.int32)


def flat_index(shape: tuple[int, ...], offset: int = 0) -> jax.Array:
    """Row-major flat index of every element of an array of ``shape``, plus ``offset`` (uint32)."""
    idx = jnp.full(shape, offset, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        idx = idx + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return idx


def _tied_min(arrays: Sequence[jax.Array], offsets: Sequence[int], t: jax.Array, lower: jax.Array) -> jax.Array:
    """Smallest flat index ``>= lower`` among elements whose key is ``t`` (``U32_MAX`` if none)."""
    out = jnp.uint32(_U32_MAX)
    for x, off in zip(arrays, offsets):
        idx = flat_index(x.shape, off)
        out = jnp.minimum(out, jnp.min(jnp.where((ukey(x) == t) & (idx >= lower), idx, jnp.uint32(_U32_MAX))))
    return out


def _nth_tie(arrays: Sequence[jax.Array], offsets: Sequence[int], t: jax.Array, need: jax.Array) -> jax.Array:
    """Flat index of the ``need``-th (0-based) element whose key is ``t``, in position order.

    A cut a few ties deep (the usual case: a handful of equal floats at the threshold) takes
    ``need + 1`` minimum passes; a deeper one counts over flat indices like :func:`kth_smallest`.
    """
    def few():
        def body(carry):
            i, lower, _, xs = carry
            # The barrier keeps XLA from hoisting the loop-invariant tie test out of the loop, which
            # would materialize it (and the flat indices) at full size; each pass recomputes it.
            xs = lax.optimization_barrier(xs)
            found = _tied_min(xs, offsets, t, lower)
            return i + 1, found + 1, found, xs

        init = (jnp.int32(0), jnp.uint32(0), jnp.uint32(_U32_MAX), tuple(arrays))
        return lax.while_loop(lambda c: c[0] <= need, body, init)[2]

    def many():
        key = lambda i, x: jnp.where(ukey(x) == t, flat_index(x.shape, offsets[i]), jnp.uint32(_U32_MAX))
        return kth_smallest(arrays, need, key)[0]

    if sum(int(x.size) for x in arrays) < SORT_BELOW:
        return many()  # one sort
    return lax.cond(need < _FEW_TIES, few, many)


@jax.jit
def bottom_k(arrays: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Boolean masks, True for exactly the ``k`` lowest scores across ``arrays``.

    Ties at the cut are broken by position (earlier array, then lower flat index, first); NaN is
    lowest. ``k`` may be traced.
    """
    offsets = [0]
    for x in arrays[:-1]:
        offsets.append(offsets[-1] + int(x.size))
    k = jnp.asarray(k, jnp.int32)
    t, c_lt, c_le = kth_smallest(arrays, k - 1, lambda i, x: ukey(x))
    t = jnp.where(k > 0, t, jnp.uint32(0))
    need = k - jnp.where(k > 0, c_lt, 0)       # ties at t still to take
    ties = jnp.where(k > 0, c_le - c_lt, 0)
    # The need-th tied position: ties before it are taken.
    cut = lax.cond(need < ties, lambda: _nth_tie(arrays, offsets, t, need),
                   lambda: jnp.where(k > 0, jnp.uint32(_U32_MAX), jnp.uint32(0)))
    return [(ukey(x) < t) | ((ukey(x) == t) & (flat_index(x.shape, off) < cut)) for x, off in zip(arrays, offsets)]

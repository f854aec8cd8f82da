"""The one bit packer: unsigned codes of ``bits`` bits each, stored back to back in ``uint8`` bytes.

Codes are packed along axis 0, little-endian: code ``i`` of a column occupies bits ``i * bits`` to
``(i + 1) * bits - 1`` of that column's bit stream, and byte ``k`` holds stream bits ``8k .. 8k + 7``
(the lowest bit first). So ``n`` codes take ``ceil(n * bits / 8)`` bytes per column, the other axes
keep their extent (and their sharding), and a flat array packs as one stream. Widths that divide 8
(1, 2, 4, 8) take a shift-and-or fast path with the same layout.

Users: ``QArray`` (int2..int7 codes along the input axis), ``SubByteArray`` (binary/ternary
codes), ``Clustered`` (codebook indices) and ``PackedSparse`` (the keep-mask, 1 bit per weight).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pack", "unpack"]


def _check_width(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"packed code width must be an int in [1, 16], got {bits!r}")


def _column(ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a 1-d array of shifts along axis 1 of an ``ndim``-d array."""
    return (-1,) + (1,) * (ndim - 2)


def pack(codes: jax.typing.ArrayLike, bits: int) -> jax.Array:
    """Packs unsigned ``bits``-wide codes along axis 0 into ``uint8``; negative ints keep their low bits.

    Args:
      codes: integer (or integer-valued float) array, shape ``(n, ...)``; a scalar counts as ``(1,)``.
      bits: width of one code, 1 to 16.

    Returns:
      ``uint8`` array of shape ``(ceil(n * bits / 8), ...)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> packed = pack(jnp.array([1, 2, 3, 0, 1]), 2)
      >>> packed.tolist(), unpack(packed, 2, 5).tolist()
      ([57, 1], [1, 2, 3, 0, 1])
      >>> unpack(pack(jnp.arange(8), 3), 3, 8).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7]
      >>> unpack(pack(jnp.array([[-2, 1], [-1, 0]]), 2), 2, 2, signed=True).tolist()
      [[-2, 1], [-1, 0]]
    """
    _check_width(bits)
    codes = jnp.asarray(codes)
    return _pack(codes.reshape(1) if codes.ndim == 0 else codes, bits)


# Called eagerly (a leaf built or densified outside jit), op-by-op dispatch compiled each of the ~10
# ops on its own for every new shape; one jitted program per (shape, bits) is several times cheaper.
@functools.partial(jax.jit, static_argnums=1)
def _pack(codes: jax.Array, bits: int) -> jax.Array:
    u = codes.astype(jnp.int32) & (2 ** bits - 1)
    n, rest = codes.shape[0], codes.shape[1:]
    if 8 % bits == 0:
        per = 8 // bits
        u = jnp.pad(u.astype(jnp.uint8), [(0, -n % per)] + [(0, 0)] * len(rest))
        u = u.reshape(u.shape[0] // per, per, *rest)
        shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape(_column(u.ndim))
        return jnp.sum(u << shifts, axis=1, dtype=jnp.uint8)  # disjoint bit fields: sum == bitwise or
    planes = (u[:, None] >> jnp.arange(bits, dtype=jnp.int32).reshape(_column(u.ndim + 1))) & 1
    stream = planes.reshape(n * bits, *rest)
    stream = jnp.pad(stream, [(0, -stream.shape[0] % 8)] + [(0, 0)] * len(rest))
    stream = stream.reshape(stream.shape[0] // 8, 8, *rest)
    return jnp.sum(stream << jnp.arange(8, dtype=jnp.int32).reshape(_column(stream.ndim)), axis=1
                   ).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, n: int, *, signed: bool = False) -> jax.Array:
    """Inverse of :func:`pack`: the first ``n`` codes along axis 0.

    Returns ``uint8`` codes for widths up to 8 and ``int32`` above; with ``signed=True`` (widths up
    to 8) the two's-complement values as ``int8``.
    """
    _check_width(bits)
    if signed and bits > 8:
        raise ValueError(f"signed codes are at most 8 bits wide, got {bits}")
    return _unpack(packed, bits, n, signed)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _unpack(packed: jax.Array, bits: int, n: int, signed: bool) -> jax.Array:
    rest = packed.shape[1:]
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape(_column(packed.ndim + 1))
        u = ((packed[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1, *rest)[:n]
    elif bits <= 8:  # a code spans at most two bytes: read both as one 16-bit word, shift, mask
        offsets = np.arange(n) * bits
        pair = jnp.pad(packed, [(0, 1)] + [(0, 0)] * len(rest)).astype(jnp.int32)
        word = pair[offsets // 8] | (pair[offsets // 8 + 1] << 8)
        within = (offsets % 8).astype(np.int32).reshape(_column(packed.ndim + 1))
        u = ((word >> within) & (2 ** bits - 1)).astype(jnp.uint8)
    else:
        stream = (packed[:, None].astype(jnp.int32) >> jnp.arange(8, dtype=jnp.int32).reshape(
            _column(packed.ndim + 1))) & 1
        planes = stream.reshape(-1, *rest)[: n * bits].reshape(n, bits, *rest)
        u = jnp.sum(planes << jnp.arange(bits, dtype=jnp.int32).reshape(_column(planes.ndim)), axis=1)
    if not signed:
        return u
    return u.astype(jnp.int8) - jnp.where(u >= 2 ** (bits - 1), 2 ** bits, 0).astype(jnp.int8)

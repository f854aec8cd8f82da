"""Weight-only integer matmul for a few input rows (decoding), streamed over tiles of the packed weights.

At batch 1 a decoder step multiplies one row per sequence by every kernel: the time is the time to read
the weights, so int8 or int4 weights can only be faster if they are read as int8 or int4. XLA:CPU does
not fuse a dequantization into a dot: ``x @ w.astype(f32)`` first writes a float32 copy of the whole
kernel (4x the bytes of int8, 8x those of int4) and reads it back, which makes it slower than float32.

:func:`streamed_matmul` walks the input axis in tiles of 128 input rows with ``lax.scan``; each step
unpacks and converts one tile (at most ``128 x out`` float32, which stays in cache), multiplies it, and
accumulates. The whole kernel is never materialized in float: compiled temporaries are one tile. A tile
of 128 codes of any width is whole bytes (``16 * bits``), so every tile starts on a byte boundary.
Scales constant over a tile (per channel, per tensor, groups of >= 128) multiply the small output,
smaller groups and zero points are applied to the tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_big import _bits
from jaxopt_big import leaves as _leaves

__all__ = ["MAX_ROWS", "TILE", "streamed_matmul"]

MAX_ROWS = 16   # input rows up to which the contraction is memory-bound (one decode step of a small batch)
TILE = 128      # input rows per tile: a float32 tile of a 5632-wide kernel (2.9 MB) stays in cache


def streamed_matmul(c: _leaves.Contraction, x: jax.Array, codes: jax.Array, bits: int, scale: jax.Array,
                    zero_point: jax.Array | None) -> jax.Array | None:
    """``c(x, (ints - zero_point) * scale)`` for a Dense layer's ``x @ kernel``, or None where it does not apply.

    Applies to a plain ``lax.dot_general`` of ``x``'s last axis with axis 0 of a 2-D kernel whose codes
    are int8 (``bits`` 8) or ``bits``-wide codes packed back to back along axis 0 in uint8 (``bits``
    2-7, as stored: an int3 kept in nibbles comes with ``bits`` 4), with at most :data:`MAX_ROWS`
    input rows and an input axis that the tiles divide. ``scale`` and ``zero_point`` are float32.
    """
    if not _applies(c, x, codes, bits, scale):
        return None
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    if bits == 4:  # byte r holds input rows 2r (low nibble) and 2r + 1 (high nibble): no unpacking
        lanes = [rows[:, 0::2], rows[:, 1::2]]
    else:
        lanes = [rows]
    y = _scan(lanes, codes, bits, scale, zero_point)
    if scale.shape[0] == 1:  # per channel or per tensor: one multiply of the output
        y = y * scale
    return y.reshape(*x.shape[:-1], -1).astype(c.dtype)


def _applies(c: _leaves.Contraction, x: jax.Array, codes: jax.Array, bits: int, scale: jax.Array) -> bool:
    if c.conv or c.op is not lax.dot_general or c.int_input is not None or codes.ndim != 2:
        return False
    dims = c.args[0] if c.args else c.kwargs.get("dimension_numbers")
    if dims != (((x.ndim - 1,), (0,)), ((), ())) or c.kwargs.get("precision") is not None:
        return False
    k, pairs = x.shape[-1], bits == 4
    if x.size // max(k, 1) > MAX_ROWS or k % TILE or codes.dtype != (jnp.int8 if bits == 8 else jnp.uint8):
        return False
    if not 2 <= bits <= 8 or codes.shape[0] * 8 != k * bits or scale.ndim != 2 or k % scale.shape[0]:
        return False
    if scale.shape[0] == 1:
        return True
    group, tile = k // scale.shape[0], TILE  # in input rows; an int4 group must not split a byte's pair
    return (not pairs or group % 2 == 0) and (group % tile == 0 or tile % group == 0)


def _scan(lanes: list[jax.Array], codes: jax.Array, bits: int, scale: jax.Array,
          zero_point: jax.Array | None) -> jax.Array:
    """Sum over tiles of ``lane_tile @ (codes_tile - zero_point) * scale`` (group scales inside, else later)."""
    tile = TILE // len(lanes)                   # weight rows per lane of a tile: 128, or 64 int4 pairs
    tiles, n = codes.shape[0] // (TILE * bits // 8), codes.shape[1]
    per_tile = scale.shape[0] // tiles          # scale rows per tile (0: a scale row spans several tiles)

    def tiled(a: jax.Array) -> jax.Array:
        """Scale or zero-point rows of each tile: (tiles, rows, n), rows dividing the tile's code rows."""
        if a.shape[0] == 1:
            return jnp.broadcast_to(a, (tiles, 1, a.shape[1]))
        if per_tile == 0:
            return jnp.repeat(a, tiles // a.shape[0], axis=0)[:, None]
        return a.reshape(tiles, per_tile, a.shape[1])

    def expand(a: jax.Array) -> jax.Array:  # (rows, n) of one tile -> broadcastable over its (tile, n) codes
        return jnp.repeat(a, tile // a.shape[0], axis=0) if a.shape[0] > 1 else a

    xs = jnp.stack([x.reshape(x.shape[0], tiles, tile).transpose(1, 0, 2) for x in lanes], 1)
    zeros = None if zero_point is None else tiled(zero_point)

    def body(acc, inputs):
        x, q, s, z = inputs
        if bits == 4:
            signed = lax.bitcast_convert_type(q, jnp.int8)
            parts = [(signed << 4) >> 4, signed >> 4]  # arithmetic shifts sign-extend
        else:  # int8 codes as they are, other widths unpacked (a tile is whole bytes)
            parts = [q if bits == 8 else _bits.unpack(q, bits, TILE, signed=True)]
        inside = s.shape[0] > 1  # several groups in this tile: scale the tile, else its (small) output
        y = jnp.zeros_like(acc)
        for xi, p in zip(x, parts):
            w = p.astype(jnp.float32)
            w = w if z is None else w - expand(z)
            y = y + xi @ (w * expand(s) if inside else w)
        return acc + (y if inside or scale.shape[0] == 1 else y * s), None

    init = jnp.zeros((lanes[0].shape[0], n), jnp.float32)
    acc, _ = lax.scan(body, init, (xs, codes.reshape(tiles, -1, n), tiled(scale), zeros))
    return acc

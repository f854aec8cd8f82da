"""Weight-only integer matmul for a few input rows (decoding): integer dots on tiles of the packed weights.

At batch 1 a decoder step multiplies one row per sequence by every kernel: the time is the time to read
the weights, so int8 or int4 weights can only be faster if they are read as int8 or int4. XLA:CPU does
not fuse a dequantization into a dot: ``x @ w.astype(f32)`` first writes a float32 copy of the whole
kernel (4x the bytes of int8, 8x those of int4) and reads it back, which makes it slower than float32.
Converting tile by tile keeps the copy in cache but still costs a conversion per weight (1.16x float32
tokens/s for int8 weights).

:func:`streamed_matmul` instead multiplies integers by integers, which XLA:CPU runs as an
``int8 x int8 -> int32`` matrix product (through YNNPACK; a product of ONE row takes a slow
matrix-vector path that converts the kernel to int32, so there are always several rows):

* **Activations as int8 planes, exactly enough.** Each float32 input row is split into
  :data:`PLANES` int8 rows: ``q1 = round(x / s1)`` with ``s1 = max|x| / 127``, then the remainder
  ``x - s1 q1`` (at most ``s1 / 2``) on a grid 254 times finer, twice. The three planes rebuild each
  entry of ``x`` to ``max|x| / (2 * 127 * 254**2)``, about 6e-8 of the row's largest entry (float32
  rounding of that entry); the dots are exact integer sums, added in float32. So an output differs from
  ``x @ dequantized_kernel`` by float32 rounding: at most about ``6e-8 max|x| sum_k |w_k|`` on top of a
  float dot's own error (two planes would leave 1.6e-5 of it). llama.cpp instead rounds activations to
  ONE 8-bit plane, which changes the results; a W8A8 layer does that knowingly, this path never does.
* **Tiles in cache.** The input axis is walked in tiles with ``lax.scan``: a tile is one scale group
  or lies inside one (:data:`TILES` rows where they fit). Each step unpacks one tile to int8 (an int4
  byte's low and high nibbles are two int8 lanes, matched with the even and odd inputs: no
  interleaving) and multiplies the planes by it. Compiled temporaries are about one int8 tile; the
  kernel is never materialized in float (nor as a whole in int8). A tile of codes is whole bytes.
  (Measured on a shared 2-core CPU: slicing a 256-row int4 tile into two 128-row groups made decoding
  slower than float32, one 128-row group per tile made it faster; one dot over a whole int8 kernel was
  slower than 256-row tiles, and 512-row tiles were no better. Two tiles under 256 rows per loop step, as separate dots
  (``lax.scan`` unrolled twice), took 0.65-0.75x the CPU time of one per step for int4 group 128 at
  2048x5632 and 5632x2048; four per step were slower than two, and two 256-row int8 tiles per step
  took 1.1x the time of one.)
* **Scales and zero points on the small output.** A tile's int32 dot (at most ``128 * 127 * 256``,
  exact in float32) is converted, its zero point subtracted as ``zero * sum(x_plane over the tile)``
  and multiplied by its scale row; scales and zero points constant along the input (per channel,
  per tensor) apply once to the final output.

What each backend gets: the same XLA program runs everywhere, but it is built and measured for XLA:CPU
only. On GPU and TPU XLA has ``int8 x int8 -> int32`` dots too, so it runs and gives the same results;
its speed there is unmeasured (the tile loop launches a few small kernels per tile, likely slower than
one dense matmul). No Pallas kernel is provided.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_big import _bits
from jaxopt_big import leaves as _leaves
from jaxopt_big.quant._w8a8 import int_dot

__all__ = ["MAX_ROWS", "PLANES", "TILES", "split_planes", "streamed_matmul"]

MAX_ROWS = 16      # input rows up to which the contraction is memory-bound (one decode step of a small batch)
PLANES = 3         # int8 planes per input row: enough for float32 precision (see the module docstring)
TILES = (256, 128)  # input rows per tile: the first that divides the input axis and its group, else the group
_STEP = 254        # each plane's grid is this much finer than the previous one: its remainder fits int8


def split_planes(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits float rows ``(r, k)`` into int8 planes ``(PLANES * r, k)`` and their scales ``(PLANES * r, 1)``.

    ``rows == sum_p scales[p * r + i] * planes[p * r + i]`` for every row ``i`` up to float32 rounding
    of ``max|row|``. An all-zero row gets scale 1; a row with inf or NaN gets non-finite scales (so the output is too).

    Examples:
      >>> import jax.numpy as jnp
      >>> planes, scales = split_planes(jnp.array([[0.5, -1.0, 0.3333333]]))
      >>> planes.tolist()
      [[64, -127, 42], [-127, 0, 85], [0, 0, -85]]
      >>> float(jnp.abs((planes * scales).sum(0) - jnp.array([0.5, -1.0, 0.3333333])).max()) < 1e-7
      True
    """
    scale = jnp.max(jnp.abs(rows), -1, keepdims=True) / 127
    scale = jnp.where(scale == 0, 1.0, scale)
    planes, scales, rest = [], [], rows
    for _ in range(PLANES):
        q = jnp.clip(jnp.round(rest / scale), -127, 127)
        planes.append(q.astype(jnp.int8))
        scales.append(scale)
        rest, scale = rest - q * scale, scale / _STEP
    return jnp.concatenate(planes), jnp.concatenate(scales)


def streamed_matmul(c: _leaves.Contraction, x: jax.Array, codes: jax.Array, bits: int, scale: jax.Array,
                    zero_point: jax.Array | None) -> jax.Array | None:
    """``c(x, (ints - zero_point) * scale)`` for a Dense layer's ``x @ kernel``, or None where it does not apply.

    Applies to a plain ``lax.dot_general`` of ``x``'s last axis with axis 0 of a 2-D kernel whose codes
    are int8 (``bits`` 8) or ``bits``-wide codes packed back to back along axis 0 in uint8 (``bits``
    2-7, as stored: an int3 kept in nibbles comes with ``bits`` 4), with at most :data:`MAX_ROWS`
    input rows and an input axis that a tile divides. ``scale`` and ``zero_point`` are float32.
    """
    tile = _tile(c, x, codes, bits, scale)
    if tile is None:
        return None
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    planes, plane_scales = split_planes(rows)
    y = _scan(planes, codes, bits, scale, zero_point, tile)
    y = (y * plane_scales).reshape(PLANES, rows.shape[0], -1).sum(0)
    if scale.shape[0] == 1:  # per channel or per tensor: one multiply of the output
        y = y * scale
    return y.reshape(*x.shape[:-1], -1).astype(c.dtype)


def _tile(c: _leaves.Contraction, x: jax.Array, codes: jax.Array, bits: int, scale: jax.Array) -> int | None:
    """Input rows per tile where the streamed product applies, else None: a tile is one scale group or
    lies inside one (slicing a tile into groups for several dots costs more than it saves)."""
    if c.conv or c.op is not lax.dot_general or c.int_input is not None or codes.ndim != 2:
        return None
    dims = c.args[0] if c.args else c.kwargs.get("dimension_numbers")
    if dims != (((x.ndim - 1,), (0,)), ((), ())) or c.kwargs.get("precision") is not None:
        return None
    k = x.shape[-1]
    if x.size // max(k, 1) > MAX_ROWS or codes.dtype != (jnp.int8 if bits == 8 else jnp.uint8):
        return None
    if not 2 <= bits <= 8 or codes.shape[0] * 8 != k * bits or scale.ndim != 2 or k % scale.shape[0]:
        return None
    group = k // scale.shape[0]
    tile = next((t for t in TILES if k % t == 0 and group % t == 0), group if group < TILES[-1] else None)
    if tile is None or tile * bits % 8 or (bits == 4 and tile % 2):  # whole bytes; int4 pairs stay together
        return None
    return tile


def _lanes(tile_codes: jax.Array, bits: int, tile: int) -> list[jax.Array]:
    """One tile's codes as int8: the low and high nibbles of int4 bytes (even and odd inputs), else all rows."""
    if bits == 4:
        signed = lax.bitcast_convert_type(tile_codes, jnp.int8)
        return [(signed << 4) >> 4, signed >> 4]  # arithmetic shifts sign-extend
    return [tile_codes if bits == 8 else _bits.unpack(tile_codes, bits, tile, signed=True)]


def _scan(planes: jax.Array, codes: jax.Array, bits: int, scale: jax.Array, zero_point: jax.Array | None,
          tile: int) -> jax.Array:
    """``planes @ (ints - zero_point) * scale`` in float32, the scale left out where it is one row."""
    r, k = planes.shape
    n, grouped = codes.shape[1], scale.shape[0] > 1
    tiles, lanes = k // tile, 2 if bits == 4 else 1

    def by_tile(a: jax.Array) -> jax.Array:
        """Scale or zero-point rows, one per tile: (tiles, n)."""
        return jnp.repeat(a, tiles // a.shape[0], axis=0)

    xs = planes.reshape(r, tiles, tile // lanes, lanes).transpose(1, 3, 0, 2)  # (tiles, lanes, r, tile / lanes)
    sums = planes.reshape(r, tiles, tile).sum(-1, dtype=jnp.int32).astype(jnp.float32).T  # exact: |sum| < 2**24
    scales = by_tile(scale) if grouped else None
    zeros = by_tile(zero_point) if grouped and zero_point is not None else None

    def body(acc, inputs):
        x, q, x_sum, s, z = inputs
        y = sum(int_dot(xi, wi) for xi, wi in zip(x, _lanes(q, bits, tile))).astype(jnp.float32)
        y = y if z is None else y - x_sum[:, None] * z
        return acc + (y if s is None else y * s), None

    init = jnp.zeros((r, n), jnp.float32)
    acc, _ = lax.scan(body, init, (xs, codes.reshape(tiles, -1, n), sums, scales, zeros),
                      unroll=2 if tile < TILES[0] else 1)  # ~256 rows per step (see the docstring)
    if not grouped and zero_point is not None:  # one zero-point row: subtract it once
        acc = acc - sums.sum(0)[:, None] * zero_point
    return acc

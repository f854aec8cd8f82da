"""Weight-only integer matmul for a few input rows (decoding): integer dots on tiles of the packed weights.

At batch 1 a decoder step multiplies one row per sequence by every kernel: the time is the time to read
the weights, so int8 or int4 weights can only be faster if they are read as int8 or int4. XLA:CPU does
not fuse a dequantization into a dot: ``x @ w.astype(f32)`` first writes a float32 copy of the whole
kernel (4x the bytes of int8, 8x those of int4) and reads it back, which makes it slower than float32.
Converting tile by tile keeps the copy in cache but still costs a conversion per weight (1.16x float32
tokens/s for int8 weights).

:func:`decode_matmul` instead multiplies integers by integers, which XLA:CPU runs as an
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
* **The decode layout** (:class:`DecodeArray`, arranged once by ``jb.quant.decode_layout``, which
  :func:`jaxopt_big.zoo.generate` calls before its decode loop): the codes of each output are
  contiguous along the input, ``(tiles, out, tile bytes)``, the order llama.cpp and PyTorch keep. The
  codes are the dot's LEFT operand (``codes (out, tile) x planes (r, tile)^T``): YNNPACK then reads
  them as they lie. The bytes are those of the ``QArray`` moved, never unpacked (an int4 byte holds the
  same two inputs in both layouts), so the leaf is no bigger. A ``QArray`` run directly
  (:func:`streamed_matmul`) takes the same walk over its own layout (codes ``(tile, out)``, the right
  operand), which XLA:CPU multiplies slower for one scale row along the input (see the measurements
  below). Kernels with group scales keep the ``QArray`` layout: one dot per group costs more with the codes
  on the left (``benchmarks/decode.py``, quiet machine: int4 group 128 at 0.83x float32 tokens/s in the
  decode layout, 1.35x as stored; int8 per channel 2.15x in the decode layout).
* **Tiles in cache.** The input axis is walked in tiles with ``lax.scan``
  (``jaxopt_big.quant._w8a8.tile_sum``, the walker the W8A8 group dots use too): a tile is one scale
  group or lies inside one (:data:`TILES` inputs where they fit); a per-channel int8 kernel in the
  decode layout is one tile (one dot). Each step unpacks one tile to int8 (an int4 byte's low and high
  nibbles are two int8 lanes, matched with the even and odd inputs: no interleaving) and multiplies the
  planes by it. Compiled temporaries are about one int8 tile; the kernel is never materialized in float
  (nor as a whole in int8). A tile of codes is whole bytes.
* **Scales and zero points on the small output.** A tile's int32 dot (exact; at most ``127**2 * tile``,
  below ``2**31`` as a tile has at most 2**16 inputs) is converted to float32 (exact up to ``2**24``, else
  rounded like a float dot's own sum), its zero point subtracted as ``zero * sum(x_plane over the tile)``
  and multiplied by its scale row; scales and zero points constant along the input (per channel, per
  tensor) apply once to the final output.

Measured (XLA:CPU, AMD EPYC with avx512_vnni, 2 cores loaded 5-7x over by other jobs, one 2048x5632
kernel and one input row, fastest of 25 interleaved rounds, three runs): float32 ``x @ w`` 1.8-2.1 ms
(memory-bound, both cores); int8 per channel in the decode layout 1.2-1.8 ms, in the ``QArray`` layout
2.2-3.4 ms (the bare int8 dot: 0.8-1.4 ms with the codes on the left, 1.4 ms on the right); int4 group
128 in either layout 2.3-2.8 ms, no faster than float32. Group scales need one dot per group: a dot over
128 inputs of all 5632 outputs costs 0.33 ms, a quarter to a third of one over all 2048 inputs, so the
sixteen group dots cost more than reading float32 weights; int8 codes with group 128 (no unpacking)
take the same time as int4, so unpacking is not the cost. Tried and slower: group dots batched over
groups (``dot_general`` with the group as batch dim: 1.3x for int4, 40x for int8), several groups per
dot with block-diagonal inputs (the compute grows with the groups: 48 rows took 8 ms), int4 lanes
interleaved back into one dot per group (5x); padding the three planes to four rows changed nothing.
(Earlier, in the ``QArray`` layout: two tiles under 256 inputs per loop step, as separate dots, took
0.65-0.75x the CPU time of one per step for int4 group 128; four were slower than two.)

What each backend gets: the same XLA program runs everywhere, but it is built and measured for XLA:CPU
only. On GPU and TPU XLA has ``int8 x int8 -> int32`` dots too, so it runs and gives the same results;
its speed there is unmeasured (the tile loop launches a few small kernels per tile, likely slower than
one dense matmul). No Pallas kernel is provided.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jaxopt_big import _bits
from jaxopt_big import leaves as _leaves
from jaxopt_big.quant._calibrate import expand, from_int
from jaxopt_big.quant._w8a8 import int_dot, tile_sum

__all__ = ["MAX_ROWS", "PLANES", "TILES", "DecodeArray", "arrange", "decode_matmul", "split_planes",
           "streamed_matmul"]

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


@struct.dataclass
class DecodeArray(_leaves.Compressed):
    """A 2-D kernel's int8 or int4 codes in the decode layout: each output's codes contiguous along the input.

    The same codes, scales and zero points as the ``QArray`` it was arranged from (:func:`arrange`,
    ``jb.quant.decode_layout``), and as many bytes; only the order differs. A Dense layer on a few rows
    (a decode step) multiplies them as integers tile by tile (:func:`decode_matmul`); any other
    contraction runs on :meth:`dense`.

    Attributes:
      codes: ``(tiles, out, tile * bits / 8)``: the input axis cut into tiles, each tile's codes row by
        output; int8 codes (``bits`` 8) or uint8 bytes of two int4 codes (an even input in the low nibble).
      scale: the ``QArray``'s scale, ``(1, out)``: per channel or per tensor (group scales stay ``QArray``).
      zero_point: affine zero point shaped like ``scale``, or None.
      bits: 8 or 4 (static).
      dense_dtype: dtype of the dense value (static).

    Examples:
      >>> import jax.numpy as jnp
      >>> w = jnp.linspace(-1.0, 1.0, 512).reshape(256, 2)
      >>> codes = jnp.round(w * 127).astype(jnp.int8)
      >>> d = arrange(codes, 8, jnp.full((1, 2), 1 / 127), None, (256, 2), jnp.float32)
      >>> d.codes.shape, d.nbytes == codes.nbytes + 8
      ((1, 2, 256), True)
      >>> bool(jnp.abs(d.dense() - w).max() <= 0.5 / 127)
      True
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    dense_dtype: Any = struct.field(pytree_node=False)

    @property
    def tile(self) -> int:
        """Inputs per tile."""
        return self.codes.shape[2] * 8 // self.bits

    @property
    def dense_shape(self) -> tuple[int, int]:
        return self.codes.shape[0] * self.tile, self.codes.shape[1]

    @property
    def kind(self) -> str:
        return f"int{self.bits} decode layout" + ("" if self.zero_point is None else " affine")

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.codes, self.scale, self.zero_point))

    def dense(self) -> jax.Array:
        return _dense(self)

    def contract(self, x: jax.Array, c: _leaves.Contraction) -> jax.Array:
        """The streamed integer product on a few rows (:func:`decode_matmul`), else ``c(x, dense)``."""
        y = decode_matmul(c, x, self)
        return c(x, self.dense()) if y is None else y


@jax.jit  # one program per layout when called eagerly
def _dense(leaf: DecodeArray) -> jax.Array:
    k, n = leaf.dense_shape
    packed = leaf.codes.transpose(0, 2, 1).reshape(-1, n)  # the QArray's layout: codes along axis 0
    ints = packed if leaf.bits == 8 else _bits.unpack(packed, leaf.bits, k, signed=True)
    zero = None if leaf.zero_point is None else expand(leaf.zero_point, (k, n))
    return from_int(ints.astype(jnp.float32), expand(leaf.scale.astype(jnp.float32), (k, n)), zero
                    ).astype(leaf.dense_dtype)


def arrange(values: jax.Array, bits: int, scale: jax.Array, zero_point: jax.Array | None,
            dense_shape: tuple[int, ...], dense_dtype: Any) -> DecodeArray | None:
    """The :class:`DecodeArray` of a 2-D kernel's codes as a ``QArray`` packs them (int8, or int4 pairs along
    axis 0 in uint8), or None where the decode layout does not apply (other widths or shapes, group scales).
    Bytes are moved, never unpacked: an int4 byte holds the same two inputs in both layouts.
    """
    if len(dense_shape) != 2 or values.dtype != (jnp.int8 if bits == 8 else jnp.uint8) or scale.ndim != 2:
        return None
    k, n = dense_shape
    tile = _tile(bits, k, scale.shape[0])
    if tile is None or values.shape != (k * bits // 8, n):
        return None
    return DecodeArray(_arranged(values, tile * bits // 8), scale, zero_point, bits, dense_dtype)


@functools.partial(jax.jit, static_argnums=1)
def _arranged(values: jax.Array, tile_bytes: int) -> jax.Array:
    return values.reshape(-1, tile_bytes, values.shape[1]).transpose(0, 2, 1)


def _tile(bits: int, k: int, groups: int) -> int | None:
    """Inputs per tile of the decode layout: a per-channel int8 kernel is one tile, else as :func:`_group_tile`;
    None for group scales, which decode faster as the ``QArray`` stores them (int4 group 128 on the benchmark
    decoder, quiet machine: 1.35x float32 tokens/s as stored, 0.83x in the decode layout)."""
    if bits not in (4, 8) or groups > 1:
        return None
    return k if bits == 8 and groups == 1 and k <= 2 ** 16 else _group_tile(k, k // groups, bits)  # no int32 overflow


def _group_tile(k: int, group: int, bits: int) -> int | None:
    """Inputs per tile: the first of :data:`TILES` that divides the input axis and the group, else the group
    (a tile is one scale group or lies inside one: slicing a tile into groups for several dots costs more
    than it saves); None where no tile fits or a tile's codes are no whole bytes (int4 pairs stay together)."""
    tile = next((t for t in TILES if k % t == 0 and group % t == 0), group if group < TILES[-1] else None)
    return None if tile is None or tile * bits % 8 or (bits == 4 and tile % 2) else tile


def decode_matmul(c: _leaves.Contraction, x: jax.Array, kernel: DecodeArray) -> jax.Array | None:
    """``c(x, kernel.dense())`` for a Dense layer's ``x @ kernel`` by integer dots, or None where it does not
    apply (see :func:`streamed_matmul`)."""
    if not _plain_rows(c, x) or kernel.dense_shape[0] != x.shape[-1]:
        return None
    return _product(c, x, kernel.codes, kernel.bits, kernel.scale.astype(jnp.float32), kernel.zero_point,
                    kernel.tile, 1)


def streamed_matmul(c: _leaves.Contraction, x: jax.Array, codes: jax.Array, bits: int, scale: jax.Array,
                    zero_point: jax.Array | None) -> jax.Array | None:
    """``c(x, (ints - zero_point) * scale)`` for a Dense layer's ``x @ kernel`` on codes as a ``QArray`` stores
    them, or None where it does not apply.

    Applies to a plain ``lax.dot_general`` of ``x``'s last axis with axis 0 of a 2-D kernel whose codes
    are int8 (``bits`` 8) or ``bits``-wide codes packed back to back along axis 0 in uint8 (``bits``
    2-7, as stored: an int3 kept in nibbles comes with ``bits`` 4), with at most :data:`MAX_ROWS`
    input rows and an input axis that a tile divides. ``scale`` and ``zero_point`` are float32.
    """
    k = x.shape[-1]
    if not _plain_rows(c, x) or codes.ndim != 2 or codes.dtype != (jnp.int8 if bits == 8 else jnp.uint8):
        return None
    if not 2 <= bits <= 8 or codes.shape[0] * 8 != k * bits or scale.ndim != 2 or k % scale.shape[0]:
        return None
    tile = _group_tile(k, k // scale.shape[0], bits)
    if tile is None:
        return None
    return _product(c, x, codes.reshape(k // tile, -1, codes.shape[1]), bits, scale, zero_point, tile, 0)


def _plain_rows(c: _leaves.Contraction, x: jax.Array) -> bool:
    """Whether ``c`` is a Dense layer's plain float ``x @ kernel`` on at most :data:`MAX_ROWS` rows."""
    if c.conv or c.op is not lax.dot_general or c.int_input is not None or c.kwargs.get("precision") is not None:
        return False
    dims = c.args[0] if c.args else c.kwargs.get("dimension_numbers")
    return dims == (((x.ndim - 1,), (0,)), ((), ())) and x.size // max(x.shape[-1], 1) <= MAX_ROWS


def _product(c: _leaves.Contraction, x: jax.Array, tiles: jax.Array, bits: int, scale: jax.Array,
             zero_point: jax.Array | None, tile: int, axis: int) -> jax.Array:
    """``x @ kernel`` from the input split into int8 planes and the kernel's codes, one tile per entry of
    ``tiles`` with its inputs along ``axis``."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    planes, plane_scales = split_planes(rows)
    y = _walk(planes, tiles, bits, scale, zero_point, tile, axis)
    y = (y * plane_scales).reshape(PLANES, rows.shape[0], -1).sum(0)
    if scale.shape[0] == 1:  # per channel or per tensor: one multiply of the output
        y = y * scale
    return y.reshape(*x.shape[:-1], -1).astype(c.dtype)


def _lanes(tile_codes: jax.Array, bits: int, tile: int) -> list[jax.Array]:
    """One tile's codes as int8: the low and high nibbles of int4 bytes (even and odd inputs), else all inputs
    (widths 2-7 occur only in the ``QArray`` layout, packed along axis 0)."""
    if bits == 4:
        signed = lax.bitcast_convert_type(tile_codes, jnp.int8)
        return [(signed << 4) >> 4, signed >> 4]  # arithmetic shifts sign-extend
    return [tile_codes if bits == 8 else _bits.unpack(tile_codes, bits, tile, signed=True)]


def _walk(planes: jax.Array, tiles: jax.Array, bits: int, scale: jax.Array, zero_point: jax.Array | None,
          tile: int, axis: int) -> jax.Array:
    """``planes @ (ints - zero_point) * scale`` in float32, the scale left out where it is one row; ``tiles``
    holds one tile of codes per entry, its inputs along ``axis``. Codes ``(n, tile)`` (the decode layout) are
    the dot's left operand: XLA:CPU multiplies a large left operand with contiguous rows fastest."""
    r, k = planes.shape
    count, lanes, grouped = k // tile, 2 if bits == 4 else 1, scale.shape[0] > 1

    def by_tile(a: jax.Array) -> jax.Array:
        """Scale or zero-point rows, one per tile, shaped to broadcast against a tile's dot (grouped scales
        occur only in the ``QArray`` layout: :func:`arrange`)."""
        return jnp.repeat(a, count // a.shape[0], axis=0)[:, None, :]

    xs = planes.reshape(r, count, tile // lanes, lanes).transpose(1, 3, 0, 2)  # (tiles, lanes, r, tile / lanes)
    sums = planes.reshape(r, count, tile).sum(-1, dtype=jnp.int32).astype(jnp.float32).T  # exact: |sum| < 2**24
    acc = tile_sum(xs, tiles, functools.partial(_lanes, bits=bits, tile=tile),
                   dot=(lambda x, w: int_dot(w, x, 1)) if axis else int_dot,
                   scales=by_tile(scale) if grouped else None,
                   zeros=by_tile(zero_point) if grouped and zero_point is not None else None,
                   sums=sums[:, None, :] if axis else sums[:, :, None],
                   unroll=2 if tile < TILES[0] else 1)  # ~256 inputs per step (see the docstring)
    acc = acc.T if axis else acc
    if not grouped and zero_point is not None:  # one zero-point row: subtract it once
        acc = acc - sums.sum(0)[:, None] * zero_point
    return acc

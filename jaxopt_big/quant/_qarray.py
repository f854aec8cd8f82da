"""`QArray`: integer values packed into bytes, with their scale and zero point.

Every width is packed at its own width (``jaxopt_big._bits``): ``n`` int3 values take
``ceil(3n / 8)`` bytes, int8 is one ``int8`` per value. Values are packed along axis 0 (the input axis
of a kernel), so a kernel sharded along its output axis keeps that sharding.

Leaves stored before widths 3, 5, 6 and 7 were packed at their own width (int3 in nibbles, int5..int7
as ``int8``) still decode: the layout is read off ``values`` (see :func:`container_bits`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxopt_big import _bits
from jaxopt_big import leaves as _leaves
from jaxopt_big.quant._calibrate import (calibrate_checked, check_input, expand, from_int, group_size, rounded_scale,
                                          to_int)
from jaxopt_big.quant import _matmul, _options, _w8a8
from jaxopt_big.quant._w8a8 import integer_contract

__all__ = ["QArray", "quantize", "dequantize", "container_bits", "integer_contract", "decode_layout"]


def container_bits(bits: int, n: int | None = None) -> int:
    """Storage bits per value of a ``bits``-wide integer packed along an axis of ``n`` values.

    A width is packed at its own width, except int3 on an axis so short (``n`` of 1, 2, 3, 4 or 6)
    that three bits save no byte over two values per byte: it keeps int4 containers there, the
    layout every int3 had before, so a stored layout is never ambiguous.

    Examples:
      >>> [container_bits(b) for b in (2, 3, 4, 5, 8)]
      [2, 3, 4, 5, 8]
      >>> container_bits(3, 6), container_bits(3, 7)
      (4, 3)
    """
    if bits == 3 and n is not None and -(-3 * n // 8) == -(-n // 2):
        return 4
    return bits


def _rows(n: int, width: int) -> int:
    return -(-n * width // 8)


def _stored_bits(values: Any, bits: int, shape: tuple[int, ...]) -> int:
    """Bits per value in ``values`` as stored: :func:`container_bits`, or the layout of leaves saved before
    int3/int5..int7 were packed at their own width (int3 in nibbles, int5..int7 one ``int8`` each)."""
    n = shape[0] if shape else 1
    width = container_bits(bits, n)
    if np.dtype(values.dtype) == np.int8 and values.shape[0] == n and bits > 4:
        return 8
    if np.dtype(values.dtype) == np.uint8 and bits < 8:
        for w in (width, 4 if bits == 3 else width):
            if values.shape[0] == _rows(n, w):
                return w
    expected = f"int8 with {n} rows" if width == 8 else f"uint8 with {_rows(n, width)} rows"
    raise ValueError(f"QArray values of dtype {values.dtype} and shape {tuple(values.shape)} are no packed int{bits} "
                     f"layout of {n} values along axis 0 (expected {expected})")


def _pack(q: jax.Array, bits: int) -> jax.Array:
    c = container_bits(bits, q.shape[0] if q.ndim else 1)
    return q.astype(jnp.int8) if c == 8 else _bits.pack(q, c)


def _unpack(packed: jax.Array, bits: int, shape: tuple[int, ...]) -> jax.Array:
    c = _stored_bits(packed, bits, shape)
    if c == 8:
        return packed
    return _bits.unpack(packed, c, shape[0] if shape else 1, signed=True).reshape(shape)


@struct.dataclass
class QArray(_leaves.Compressed):
    """Packed integer values standing for a floating array: ``dense = (int - zero_point) * scale``.

    Runs as an integer contraction inside a layer (its execution hook, see :meth:`contract`).

    The integer codes may themselves be a compressed leaf: an 8-bit ``QArray`` whose ``values`` are a
    ``PackedSparse`` of its int8 codes (``jb.sparsity.pack_array(q)``) is a pruned-then-quantized
    kernel in one leaf; its ``nbytes`` counts the mask bits, the kept int8 codes and the scales.

    Attributes:
      values: packed integers (int8 for int8, else uint8 holding ``bits``-wide codes back to back along
        axis 0), or a compressed leaf standing for the int8 codes (a ``PackedSparse`` of them).
      scale: scale with the dense array's ndim (1 along reduced axes): float32, or the spec's
        ``scale_dtype`` (float16, bfloat16) when it has one.
      zero_point: affine zero point shaped like ``scale``, or None for symmetric grids.
      bits: integer width (static).
      axis: channel axis of per-channel/group scales, None for per-tensor (static).
      dense_shape, dense_dtype: shape and dtype of the dense value (static).
      group_size: entries per scale along the grouped axis when the last group is shorter, None
        otherwise (static): ``Group(128)`` on 176 inputs stores two scale rows, for inputs
        ``[0, 128)`` and ``[128, 176)``; equal groups are read off the scale's shape.
      activations: None (weight-only), or the grid the layer's input is put on at run time (static):
        a symmetric per-token ``QuantSpec`` (W8A8: int8 per token), from the spec's ``activations``.
        The contraction then runs ``int8 x int8 -> int32`` (see :mod:`jaxopt_big.quant._w8a8`).
    """

    values: Any
    scale: jax.Array
    zero_point: jax.Array | None
    bits: int = struct.field(pytree_node=False)
    axis: int | None = struct.field(pytree_node=False)
    dense_shape: tuple[int, ...] = struct.field(pytree_node=False)
    dense_dtype: Any = struct.field(pytree_node=False)
    group_size: int | None = struct.field(pytree_node=False, default=None)
    activations: Any = struct.field(pytree_node=False, default=None)

    @property
    def kind(self) -> str:
        c = self.stored_bits
        codes = f" {self.values.kind}" if _leaves.is_compressed(self.values) else ""
        return (f"int{self.bits}" + (f" in int{c}" if c != self.bits else "") + codes
                + ("" if self.zero_point is None else " affine")
                + ("" if self.activations is None else f" a{self.activations.bits}"))

    @property
    def scale32(self) -> jax.Array:
        """The scale in float32, the dtype all arithmetic with it runs in (it may be stored narrower)."""
        return self.scale.astype(jnp.float32)

    @property
    def stored_bits(self) -> int:
        """Bits per value as ``values`` holds them (8 for compressed int8 codes); see :func:`container_bits`."""
        if _leaves.is_compressed(self.values):
            return 8
        return _stored_bits(self.values, self.bits, self.dense_shape)

    @property
    def nbytes(self) -> int:
        return _leaves.nbytes((self.values, self.scale, self.zero_point))

    def nonzero_fraction(self) -> float | None:
        return self.values.nonzero_fraction() if _leaves.is_compressed(self.values) else None

    def int_values(self) -> jax.Array:
        """Unpacked signed integers (int8) with the dense shape."""
        if _leaves.is_compressed(self.values):
            return self.values.dense().astype(jnp.int8).reshape(self.dense_shape)
        return _unpack(self.values, self.bits, self.dense_shape)

    def dense(self) -> jax.Array:
        return _dense(self)

    def contract(self, x: jax.Array, c: _leaves.Contraction) -> jax.Array:
        """Integer execution where the scales allow it (see :func:`integer_contract`), else the
        contraction with the dense value; the gradient is always that of the dense contraction.

        A Dense layer on a few rows (a decode step) streams the packed codes tile by tile instead
        (:func:`jaxopt_big.quant._matmul.streamed_matmul`), never building the float kernel. With
        ``activations`` the input is quantized per token and the contraction runs on the two integer
        grids (:func:`jaxopt_big.quant._w8a8.contract`)."""
        if self.activations is not None:
            return _w8a8.contract(c, x, self)
        if not _leaves.is_compressed(self.values) and self.group_size is None:  # tiles assume equal groups
            y = _matmul.streamed_matmul(c, x, self.values, self.stored_bits, self.scale32, self.zero_point)
            if y is not None:
                return y
        y = None if self.zero_point is not None else integer_contract(c, x, self.int_values(), self.scale32)
        if y is None:
            return c(x, self.dense())
        return y if c.int_input is None else c.straight_through(x, self, y, dense=QArray.dense)


@jax.jit  # one program per leaf layout when called eagerly, not one per op
def _dense(leaf: QArray) -> jax.Array:
    q = leaf.int_values().astype(jnp.float32)
    shape, group = leaf.dense_shape, leaf.group_size
    zp = None if leaf.zero_point is None else expand(leaf.zero_point, shape, group)
    return from_int(q, expand(leaf.scale32, shape, group), zp).astype(leaf.dense_dtype)


def integer_quantize(x, spec: _options.IntegerGrid, scale=None, zero_point=None, *, path: str = "") -> QArray:
    x = check_input(x, path)
    if scale is None:
        scale, zero_point = calibrate_checked(x, spec, path)
    scale = jnp.asarray(scale, jnp.float32)
    scale = scale.reshape((1,) * x.ndim) if scale.ndim == 0 else scale
    zp = None if zero_point is None else jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), scale.shape)
    axis = None if isinstance(spec.granularity, _options.PerTensor) else spec.axis % max(x.ndim, 1)
    scale = rounded_scale(scale, spec)  # a given scale too: the codes are those of the scale that is stored
    values = _codes(x, scale, zp, spec)
    dtype = getattr(spec, "scale_dtype", None)  # stored in it: the rounded scales are exact there
    out = QArray(values=values, scale=scale if dtype is None else scale.astype(dtype), zero_point=zp, bits=spec.bits,
                 axis=axis, dense_shape=tuple(x.shape), dense_dtype=np.dtype(x.dtype),
                 group_size=group_size(x.shape, spec), activations=getattr(spec, "activations", None))
    return _leaves.place_like(out, x)


@functools.partial(jax.jit, static_argnums=3)  # one program per (shape, spec), not one per op
def _codes(x: jax.Array, scale: jax.Array, zp: jax.Array | None, spec: _options.IntegerGrid) -> jax.Array:
    """The packed integer codes of ``x`` on ``spec``'s grid with the given scale and zero point."""
    group = group_size(x.shape, spec)
    q = to_int(x.astype(jnp.float32), spec, expand(scale, x.shape, group),
               None if zp is None else expand(zp, x.shape, group))
    return _pack(q, spec.bits)


def quantize(x: jax.typing.ArrayLike, spec: _options.Format, *, path: str = "") -> Any:
    """Quantizes ``x`` into a compressed leaf (a :class:`QArray` for integer specs).

    Outside ``jit``, a parameter with a ``NamedSharding`` gives values/scales with the same
    sharding on every axis they still span.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> w = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)
      >>> q = quantize(w, QuantSpec(bits=4, granularity=PER_CHANNEL))
      >>> q.values.dtype, q.values.shape, q.nbytes
      (dtype('uint8'), (2, 2), 12)
      >>> bool(jnp.abs(dequantize(q) - w).max() <= q.scale.max() / 2)
      True
    """
    if not isinstance(spec, _options.Format):
        raise TypeError(f"{path + ': ' if path else ''}expected a QuantSpec or Format, got {spec!r}")
    return spec.quantize(x, path=path)


def dequantize(q: Any) -> jax.Array:
    """The dense value of a quantized leaf (arrays pass through).

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> dequantize(quantize(jnp.array([0.0, 1.0]), QuantSpec(bits=8))).tolist()
      [0.0, 1.0]
    """
    return q.dense() if _leaves.is_compressed(q) else jnp.asarray(q)


def decode_layout(tree: Any) -> Any:
    """``tree`` with each weight-only int8 or int4 2-D ``QArray`` kernel re-arranged for decoding: a
    :class:`~jaxopt_big.quant._matmul.DecodeArray` of the same codes and bytes, each output's codes
    contiguous, which a decode step (a few rows) multiplies faster. Arrange once, outside a decode loop
    (:func:`jaxopt_big.zoo.generate` does); other leaves, and kernels no tile fits, stay as they are.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> q = quantize(jnp.ones((256, 4)), QuantSpec(bits=8, granularity=PER_CHANNEL))
      >>> d = decode_layout({"kernel": q})["kernel"]
      >>> d.kind, d.nbytes == q.nbytes, bool((d.dense() == q.dense()).all())
      ('int8 decode layout', True, True)
    """
    return jax.tree.map(_for_decoding, tree, is_leaf=_leaves.is_compressed)


def _for_decoding(leaf: Any) -> Any:
    if (not isinstance(leaf, QArray) or leaf.activations is not None or leaf.group_size is not None
            or _leaves.is_compressed(leaf.values)):
        return leaf
    out = _matmul.arrange(leaf.values, leaf.stored_bits, leaf.scale, leaf.zero_point, leaf.dense_shape,
                          leaf.dense_dtype)
    return leaf if out is None else out

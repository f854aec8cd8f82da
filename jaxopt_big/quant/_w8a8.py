"""Integer contractions: ``int8 x int8 -> int32`` matmuls, and the W8A8 execution of a kernel whose
inputs are quantized at run time.

A ``QArray`` quantized with a spec that has ``activations`` (for W8A8:
``QuantSpec(bits=8, granularity=PER_CHANNEL, activations=QuantSpec(bits=8, granularity=PER_TOKEN))``)
stands for a layer whose input is put on that grid on every call, one scale per token (row) from
the row's own absmax. Its contraction is ``(q_x @ q_w) * s_x * s_w``: one integer dot accumulating
in int32, which is exact, then one float rescale of the output; nothing float of the kernel's size
is built. A Dense kernel with group scales along its inputs (W4A8 with ``Group(128)``) runs one
int32 dot per group and sums the rescaled groups. An affine weight, or group scales in another
contraction, cannot be factored out of the integer dot; such a layer computes the same numbers on
the float path (quantized input times the dense kernel).

XLA:CPU runs an int8 dot with a single row far slower than one with two rows (a decode step of one
sequence), so a single row is padded to two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxopt_big import leaves as _leaves
from jaxopt_big.quant import _options
from jaxopt_big.quant._calibrate import calibrate_checked, from_int, to_int

__all__ = ["integer_contract", "quantize_tokens", "contract", "int_dot", "tile_sum"]


def integer_contract(c: _leaves.Contraction, x: jax.Array, ints: jax.Array, scale: jax.Array) -> jax.Array | None:
    """``c(x, ints * scale)`` by integer arithmetic, or None when ``scale`` (or the input's) varies
    along the contraction.

    With the input on an integer grid too (``c.int_input``) it runs ``int8 x int8 -> int32``; else
    it contracts the input with the integer weights (the dequantization happens in the matmul).
    Either way one rescale of the output follows.
    """
    x_int = c.int_input
    out_scale = c.out_scale(x, None if x_int is None else x_int[1], scale)
    if out_scale is None:
        return None
    if x_int is None:
        acc = c(x, ints.astype(x.dtype))
    else:
        acc = c(x_int[0].astype(jnp.int8), ints.astype(jnp.int8), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * out_scale).astype(c.dtype)


def quantize_tokens(x: jax.Array, spec: _options.IntegerGrid) -> tuple[jax.Array, jax.Array]:
    """``(codes, scale)`` of ``x`` on ``spec``'s grid (symmetric, per token): int8 codes shaped like ``x``
    and a float32 scale ``(..., 1)``, with ``x == codes * scale`` up to rounding.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_TOKEN
      >>> q, s = quantize_tokens(jnp.array([[1.0, -0.5], [0.0, 0.25]]), QuantSpec(granularity=PER_TOKEN))
      >>> q.tolist(), (s * 127).ravel().tolist()
      ([[127, -64], [0, 127]], [1.0, 0.25])
    """
    xf = x.astype(jnp.float32)
    scale, _ = calibrate_checked(xf, spec)
    return to_int(xf, spec, scale, None).astype(jnp.int8), scale


def int_dot(a: jax.Array, b: jax.Array, axis: int = 0) -> jax.Array:
    """``a @ b`` (``axis`` 0) or ``a @ b.T`` (``axis`` 1) of 2-d int8 operands, accumulated exactly in int32."""
    return lax.dot_general(a, b, (((1,), (axis,)), ((), ())), preferred_element_type=jnp.int32)


def tile_sum(xs: jax.Array, ws: jax.Array, lanes: Callable[[jax.Array], list[jax.Array]], *,
             dot: Callable[[jax.Array, jax.Array], jax.Array] = int_dot, scales: jax.Array | None = None,
             zeros: jax.Array | None = None, sums: jax.Array | None = None, unroll: int = 1) -> jax.Array:
    """``sum_t (sum_l dot(xs[t, l], lanes(ws[t])[l]) - sums[t] * zeros[t]) * scales[t]`` in float32, one tile per
    step of a ``lax.scan`` (so nothing ``tiles x rows x out`` is built, and a tile's unpacked codes stay in cache).

    ``xs``: int8 input rows per tile and lane, ``(tiles, lanes, r, k_lane)``; ``ws``: the codes of each tile;
    ``lanes`` unpacks one tile to the int8 operands matched with ``xs[t]``'s lanes; ``dot`` is their exact int32
    product (:func:`int_dot`: ``(r, n)`` from codes ``(k_lane, n)``). ``scales``, ``zeros`` and ``sums`` (each row's
    input sum over the tile, which a zero point multiplies) are optional, one entry per tile, each broadcasting
    against ``dot``'s output.
    """
    def step(x, w, s, z, x_sum):
        y = sum(dot(a, b) for a, b in zip(x, lanes(w))).astype(jnp.float32)
        y = y if z is None else y - x_sum * z
        return y if s is None else y * s

    inputs = (xs, ws, scales, zeros, sums)

    def at(t: jax.Array | int) -> jax.Array:  # tile t, read in place (slicing off the first tile copies the rest)
        return step(*jax.tree.map(lambda a: a[t], inputs))

    # the first tile starts the sum: the carry then has the operands' sharding
    acc, _ = lax.scan(lambda acc, t: (acc + at(t), None), at(0), jnp.arange(1, xs.shape[0]), unroll=unroll)
    return acc


def _grouped(rows: jax.Array, w: jax.Array, w_scale: jax.Array, size: int) -> jax.Array:
    """``sum_g (rows_g @ w_g) * w_scale_g`` over groups of ``size`` inputs (the last may be shorter, padded
    with zeros): one exact int32 dot per group (:func:`tile_sum`)."""
    groups, n = w_scale.shape
    pad = groups * size - w.shape[0]
    xs = jnp.pad(rows, ((0, 0), (0, pad))).reshape(rows.shape[0], groups, 1, size).transpose(1, 2, 0, 3)
    ws = jnp.pad(w, ((0, pad), (0, 0))).reshape(groups, size, n)
    return tile_sum(xs, ws, lambda tile: [tile], scales=w_scale[:, None])


def _dense_rows(c: _leaves.Contraction, q: jax.Array, s: jax.Array, w: jax.Array, w_scale: jax.Array,
                group: int | None) -> jax.Array | None:
    """A Dense layer's ``x @ kernel`` on int8 rows: ``(q @ w) * s * w_scale`` (by groups of inputs for group
    scales), or None where it does not apply (another contraction or scale layout)."""
    if c.conv or c.op is not lax.dot_general or w.ndim != 2 or w_scale.shape[1] not in (1, w.shape[1]):
        return None
    dims = c.args[0] if c.args else c.kwargs.get("dimension_numbers")
    if dims != (((q.ndim - 1,), (0,)), ((), ())):
        return None
    rows, w = q.reshape(-1, q.shape[-1]), w.astype(jnp.int8)
    m, groups = rows.shape[0], w_scale.shape[0]
    if m == 1:  # XLA:CPU's one-row int8 dot is slow; two rows are not
        rows = jnp.pad(rows, ((0, 1), (0, 0)))
    if groups == 1:
        acc = int_dot(rows, w).astype(jnp.float32) * w_scale
    else:
        acc = _grouped(rows, w, w_scale, group or w.shape[0] // groups)
    y = acc[:m] * s.reshape(m, 1)
    return y.reshape(*q.shape[:-1], w.shape[1]).astype(c.dtype)


def _integer(c: _leaves.Contraction, x: jax.Array, leaf: Any) -> jax.Array:
    q, s = quantize_tokens(x, leaf.activations)
    if leaf.zero_point is None:
        ints, w_scale = leaf.int_values(), leaf.scale32
        y = _dense_rows(c, q, s, ints, w_scale, leaf.group_size)
        if y is None:
            y = integer_contract(dataclasses.replace(c, int_input=(q, s)), x, ints, w_scale)
        if y is not None:
            return y
    return c(from_int(q.astype(jnp.float32), s, None).astype(x.dtype), leaf.dense())


def contract(c: _leaves.Contraction, x: jax.Array, leaf: Any) -> jax.Array:
    """``c(x, kernel)`` of a kernel ``leaf`` (a ``QArray`` with ``activations``) whose input is quantized
    per token on ``leaf.activations``: ``int8 x int8 -> int32`` where the scales allow it.

    The gradient is that of the float contraction with the dense kernel (straight through the
    rounding of the input), which is computed only when differentiated.
    """
    return c.straight_through(x, leaf, _integer(c, x, leaf), dense=lambda k: k.dense())

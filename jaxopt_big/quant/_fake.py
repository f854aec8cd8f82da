"""Fake quantization (quantize then dequantize in floating point) with straight-through gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxopt_big.quant._calibrate import (calibrate_checked, check_grid, check_input, expand, from_int, group_size,
                                         to_int, unclipped)
from jaxopt_big.quant import _options

__all__ = ["fake_quant", "ste"]


def ste(x: jax.Array, value: jax.Array, inside: jax.Array | None = None) -> jax.Array:
    """``value`` forward (bit for bit); gradient 1 where ``inside`` (everywhere if None), else 0.

    The straight-through estimator. ``inside=None`` skips the mask where nothing can be clipped
    (scales calibrated on the same values by absmax).

    Examples:
      >>> x = jnp.array([0.4, 3.0])
      >>> jax.grad(lambda x: ste(x, jnp.round(x), x < 1).sum())(x).tolist()
      [1.0, 0.0]
    """
    delta = x - jax.lax.stop_gradient(x)  # exactly zero forward, identity gradient
    return value + (delta if inside is None else jnp.where(inside, delta, jnp.zeros_like(delta)))


def integer_fake_quant(x, spec: _options.IntegerGrid, scale=None, zero_point=None, *, path: str = ""):
    x = check_input(x, path)
    if scale is None:
        scale, zero_point = jax.lax.stop_gradient(calibrate_checked(x, spec, path))
    else:
        scale, zero_point = check_grid(scale, zero_point, path)
    return _integer_fake_quant(x, scale, zero_point, spec)


@functools.partial(jax.jit, static_argnums=3)  # one program per (shape, spec), not one per op
def _integer_fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None, spec: _options.IntegerGrid):
    group = group_size(x.shape, spec)
    s = expand(scale, x.shape, group)
    z = None if zero_point is None else expand(zero_point, x.shape, group)
    xf = x.astype(jnp.float32)
    value = from_int(to_int(xf, spec, s, z), s, z)
    return ste(xf, value, unclipped(xf / s if z is None else xf / s + z, spec)).astype(x.dtype)


def fake_quant(x: jax.typing.ArrayLike, spec: _options.Format, scale: jax.typing.ArrayLike | None = None,
               zero_point: jax.typing.ArrayLike | None = None, *, path: str = "") -> jax.Array:
    """Quantizes and dequantizes ``x`` on ``spec``'s grid; gradients pass straight through.

    The gradient with respect to ``x`` is 1 inside the clipping range and 0 outside it; a value
    counts as clipped only if it lies beyond the range by more than rounding (half a step), so every
    value of a range calibrated on ``x`` itself (absmax, min-max) keeps its gradient.

    Args:
      x: floating array.
      spec: a :class:`QuantSpec` or any :class:`Format`.
      scale: precomputed scale (e.g. static activation scales); calibrated from ``x`` (without
        gradient) when None. A concrete one must be finite and > 0.
      zero_point: precomputed zero point for affine grids (finite).
      path: leaf path used in error messages.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec
      >>> x = jnp.array([0.26, -1.0, 3.0])
      >>> fake_quant(x, QuantSpec(bits=2), scale=1.0).tolist()
      [0.0, -1.0, 1.0]
      >>> jax.grad(lambda x: fake_quant(x, QuantSpec(bits=2), scale=1.0).sum())(x).tolist()
      [1.0, 1.0, 0.0]
    """
    if not isinstance(spec, _options.Format):
        raise TypeError(f"{path + ': ' if path else ''}expected a QuantSpec or Format, got {spec!r}")
    return spec.fake_quant(x, scale, zero_point, path=path)

"""AWQ: activation-aware per-input-channel weight scales (Lin et al., 2024).

A few input channels carry most of the activation magnitude; their weights matter most. AWQ scales
input channel ``j`` of a kernel by ``s_j`` before quantizing and divides the input by ``s_j``
(folded into the preceding RMSNorm weight or linear), so those weights get a finer relative grid:
``X W ≈ (X diag(1/s)) Q(diag(s) W)``. The scales are ``s = a^α / sqrt(max(a^α) min(a^α))`` with
``a`` the mean ``|x|`` per input channel, and ``α`` searched on a grid ``0, 1/n, ..., (n-1)/n`` (the
reference's 20 points) for the least output error on the calibration inputs.

The error is measured from the input Hessian ``H = X^T X`` alone, as the engine's other solvers do:
``sum_k tr(D_k^T H D_k)`` with ``D_k = diag(1/s) Q(diag(s) W_k) - W_k`` summed over the kernels that
read the same input (q/k/v, or gate/up), which share one ``s`` because one op is folded for all of
them. The reference measures the output of the whole block instead; the per-linear error is what
the Hessian gives without running the block once per candidate. ``α = 0`` is ``s = 1``, plain
round-to-nearest, so the chosen scales are never worse than RTN on this error. The reference's
second step, a search of per-group weight clipping ranges, is not done here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big.quant import _options

__all__ = ["awq_scales", "AWQScales"]


class AWQScales(NamedTuple):
    """What :func:`awq_scales` found.

    Attributes:
      scales: ``(d_in,)`` per-input-channel scales ``s`` (multiply the kernels' rows, divide the input).
      alpha: the chosen exponent (a float32 scalar).
      errors: ``(grid,)`` output error per candidate ``α = i / grid``; ``errors[0]`` is plain RTN's.
    """

    scales: jax.Array
    alpha: jax.Array
    errors: jax.Array


def _candidate(act: jax.Array, alpha: jax.Array) -> jax.Array:
    """The reference's scales for one ``α``: ``a^α`` (at least 1e-4), normalized to geometric mid-range 1."""
    s = jnp.maximum(act ** alpha, 1e-4)
    return s / jnp.sqrt(s.max() * s.min())


def _output_error(kernel: jax.Array, hessian: jax.Array, s: jax.Array, spec: _options.Format) -> jax.Array:
    """``tr(D^T H D)`` for ``D = diag(1/s) Q(diag(s) W) - W``."""
    d = spec.fake_quant(kernel * s[:, None]) / s[:, None] - kernel
    return jnp.sum(d * (hessian @ d))


@functools.partial(jax.jit, static_argnames=("spec", "grid"))
def _search(kernels: tuple[jax.Array, ...], hessian: jax.Array, act: jax.Array, spec: _options.Format,
            grid: int) -> AWQScales:
    alphas = jnp.arange(grid, dtype=jnp.float32) / grid

    def error(alpha):
        s = _candidate(act, alpha)
        return sum(_output_error(k, hessian, s, spec) for k in kernels)

    errors = jax.lax.map(error, alphas)  # one candidate at a time: memory of one kernel set, not `grid`
    best = jnp.argmin(jnp.where(jnp.isnan(errors), jnp.inf, errors))  # first minimum, as the reference
    return AWQScales(_candidate(act, alphas[best]), alphas[best], errors)


def awq_scales(kernels: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike], hessian: jax.typing.ArrayLike,
               spec: _options.Format, *, act_scale: jax.typing.ArrayLike | None = None, grid: int = 20,
               path: str = "kernel") -> AWQScales:
    """Searches AWQ's per-input-channel scales for the kernels that read one input.

    Args:
      kernels: a Dense kernel ``(d_in, d_out)`` or a sequence of them with the same ``d_in`` (the
        linears fed by one op, which all get the same scales).
      hessian: ``(d_in, d_in)`` input Hessian ``X^T X`` of the calibration inputs.
      spec: the weight format (e.g. ``QuantSpec(bits=4, granularity=Group(128))``); the kernels are
        quantized by its own calibration (round-to-nearest).
      act_scale: ``(d_in,)`` mean ``|x|`` per input channel (the reference's statistic). None: the
        root mean square ``sqrt(diag H)``, which the Hessian holds (any constant factor cancels in
        the normalization).
      grid: number of candidate exponents ``α = i / grid``, ``i = 0..grid-1``.
      path: layer name used in error messages.

    Returns:
      :class:`AWQScales`. Apply them with :func:`scale_input_channels` on every kernel and
      :func:`unscale_output_channels` on the op that produces their input.

    Raises:
      ValueError: naming ``path`` for a kernel that is not 2-d, mismatched shapes, NaN/Inf, a
        negative ``act_scale``, or a spec layout the kernel does not fit.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> x = jax.random.normal(jax.random.key(0), (256, 16)).at[:, 3].mul(40.0)  # one outlier channel
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> spec = QuantSpec(bits=3, granularity=PER_CHANNEL)
      >>> found = awq_scales(w, x.T @ x, spec, act_scale=jnp.abs(x).mean(0))
      >>> found.scales.shape, bool(found.errors.min() < found.errors[0])   # better than RTN (alpha 0)
      ((16,), True)
    """
    if not isinstance(spec, _options.Format):
        raise TypeError(f"{path}: AWQ needs a QuantSpec or Format, got {spec!r}")
    group = [jnp.asarray(k) for k in (kernels if isinstance(kernels, (list, tuple)) else [kernels])]
    if not group:
        raise ValueError(f"{path}: AWQ needs at least one kernel")
    for i, k in enumerate(group):
        if k.ndim != 2 or k.shape[0] != group[0].shape[0]:
            raise ValueError(f"{path}: AWQ needs 2-d kernels (d_in, d_out) with one d_in, got shapes "
                             f"{[tuple(k.shape) for k in group]}")
        jax.eval_shape(functools.partial(spec.fake_quant, path=f"{path}[{i}]" if len(group) > 1 else path), k)
    d_in = group[0].shape[0]
    if jnp.shape(hessian) != (d_in, d_in):
        raise ValueError(f"{path}: hessian has shape {jnp.shape(hessian)}, expected {(d_in, d_in)}")
    hessian = jnp.asarray(hessian, jnp.float32)
    act = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian), 0.0)) if act_scale is None else jnp.asarray(act_scale)
    if act.shape != (d_in,):
        raise ValueError(f"{path}: act_scale has shape {act.shape}, expected {(d_in,)}")
    grid = _checks.integer(f"{path}: AWQ grid", grid, low=1)
    _checks.finite([(path, k) for k in group] + [(f"{path} hessian", hessian), (f"{path} act_scale", act)],
                   "AWQ inputs")
    if not _checks.is_traced(act) and bool(jnp.any(act < 0)):
        raise ValueError(f"{path}: act_scale must be >= 0 (a mean |x|), got min {float(act.min())}")
    return _search(tuple(k.astype(jnp.float32) for k in group), hessian, act.astype(jnp.float32), spec, grid)

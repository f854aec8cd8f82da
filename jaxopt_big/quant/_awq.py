"""AWQ: activation-aware per-input-channel weight scales (Lin et al., 2024).

A few input channels carry most of the activation magnitude; their weights matter most. AWQ scales
input channel ``j`` of a kernel by ``s_j`` before quantizing and divides the input by ``s_j``
(folded into the preceding RMSNorm weight or linear), so those weights get a finer relative grid:
``X W ≈ (X diag(1/s)) Q(diag(s) W)``. The scales are ``s = a^α / sqrt(max(a^α) min(a^α))`` with
``a`` the mean ``|x|`` per input channel, and ``α`` searched on a grid ``0, 1/n, ..., (n-1)/n`` (the
reference's 20 points) for the least output error on the calibration inputs. With ``duo`` (AutoAWQ's
default, not llm-awq's) ``a^α`` is ``a^α / (w^(1-α) + 1e-4)`` instead, ``w`` the mean over output
channels of ``|W|`` normalized to its quantization group's largest ``|W|``.

What the error measures is the caller's (``measure``). The reference measures the output of the
module the scaled linears feed (the attention for q/k/v, the MLP for gate/up; for o_proj and
down_proj the linear itself); :func:`jaxopt_big.oneshot.compress` does that by running the block
(see :class:`jaxopt_big.AWQ`). Without ``measure`` the error is the linears' own output error from
the input Hessian ``H = X^T X`` alone: ``sum_k tr(D_k^T H D_k)`` with
``D_k = diag(1/s) Q(diag(s) W_k) - W_k`` summed over the kernels that read the same input (q/k/v, or
gate/up), which share one ``s`` because one op is folded for all of them. Without ``duo``, ``α = 0``
is ``s = 1``, plain round-to-nearest, so the chosen scales are never worse than RTN on the error
measured.

The reference's second step, :func:`awq_clip`, shrinks the range of each quantization group of each
output channel (``|w| <= r max|w|``, ``r`` on a grid ``1, 1 - 1/n, ...`` down to ``1 - max_shrink``)
to the ratio with the least output error of that group's partial sum. That error is
``d^T H_gg d`` with ``H_gg`` the group's diagonal block of the Hessian, so it is measured on every
calibration row, not on the reference's 512 sampled tokens. Ratio 1 is no clipping.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big.quant import _options

__all__ = ["awq_scales", "AWQScales", "awq_clip", "AWQClip"]


class AWQScales(NamedTuple):
    """What :func:`awq_scales` found.

    Attributes:
      scales: ``(d_in,)`` per-input-channel scales ``s`` (multiply the kernels' rows, divide the input).
      alpha: the chosen exponent (a float32 scalar).
      errors: ``(grid,)`` output error per candidate ``α = i / grid``; without ``duo``, ``errors[0]``
        is plain RTN's.
      candidates: ``(grid, d_in)`` the candidate scales, one row per ``α``.
    """

    scales: jax.Array
    alpha: jax.Array
    errors: jax.Array
    candidates: jax.Array


def _weight_mean(kernels: tuple[jax.Array, ...], spec: _options.Format) -> jax.Array:
    """``(d_in,)`` mean over the output channels of all kernels of ``|w|`` / its group's max ``|w|`` (+1e-6)."""
    d_in = kernels[0].shape[0]
    size = _group_size(spec, d_in)
    parts = []
    for k in kernels:
        peak = jnp.repeat(jnp.abs(_blocks(k, size)).max(axis=1), size, axis=0)[:d_in]
        parts.append(jnp.abs(k) / (peak + 1e-6))
    return jnp.concatenate(parts, axis=1).mean(axis=1)


@functools.partial(jax.jit, static_argnames=("grid",))
def _candidates(act: jax.Array, weight: jax.Array | None, grid: int) -> jax.Array:
    """The reference's scales per ``α = i / grid``: ``a^α`` (or ``a^α / (w^(1-α) + 1e-4)``), at least
    1e-4, normalized to geometric mid-range 1: ``(grid, d_in)``."""
    alphas = jnp.arange(grid, dtype=jnp.float32)[:, None] / grid
    s = act ** alphas if weight is None else act ** alphas / (weight ** (1 - alphas) + 1e-4)
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(s.max(axis=1, keepdims=True) * s.min(axis=1, keepdims=True))


def _output_error(kernel: jax.Array, hessian: jax.Array, s: jax.Array, spec: _options.Format) -> jax.Array:
    """``tr(D^T H D)`` for ``D = diag(1/s) Q(diag(s) W) - W``."""
    d = spec.fake_quant(kernel * s[:, None]) / s[:, None] - kernel
    return jnp.sum(d * (hessian @ d))


@functools.partial(jax.jit, static_argnames=("spec",))
def _hessian_errors(kernels: tuple[jax.Array, ...], hessian: jax.Array, candidates: jax.Array,
                    spec: _options.Format) -> jax.Array:
    # one candidate at a time: memory of one kernel set, not `grid`
    return jax.lax.map(lambda s: sum(_output_error(k, hessian, s, spec) for k in kernels), candidates)


@jax.jit
def _pick(candidates: jax.Array, errors: jax.Array) -> AWQScales:
    best = jnp.argmin(jnp.where(jnp.isnan(errors), jnp.inf, errors))  # first minimum, as the reference
    return AWQScales(candidates[best], best.astype(jnp.float32) / candidates.shape[0], errors, candidates)


def awq_scales(kernels: jax.typing.ArrayLike | Sequence[jax.typing.ArrayLike], hessian: jax.typing.ArrayLike | None,
               spec: _options.Format, *, act_scale: jax.typing.ArrayLike | None = None, grid: int = 20,
               duo: bool = False, measure: Callable[[jax.Array], jax.Array] | None = None,
               path: str = "kernel") -> AWQScales:
    """Searches AWQ's per-input-channel scales for the kernels that read one input.

    Args:
      kernels: a Dense kernel ``(d_in, d_out)`` or a sequence of them with the same ``d_in`` (the
        linears fed by one op, which all get the same scales).
      hessian: ``(d_in, d_in)`` input Hessian ``X^T X`` of the calibration inputs; may be None when
        ``measure`` and ``act_scale`` are given.
      spec: the weight format (e.g. ``QuantSpec(bits=4, granularity=Group(128))``); the kernels are
        quantized by its own calibration (round-to-nearest).
      act_scale: ``(d_in,)`` mean ``|x|`` per input channel (the reference's statistic). None: the
        root mean square ``sqrt(diag H)``, which the Hessian holds (any constant factor cancels in
        the normalization).
      grid: number of candidate exponents ``α = i / grid``, ``i = 0..grid-1``.
      duo: also divide by the kernels' normalized mean ``|w|`` to the power ``1 - α`` (AutoAWQ's
        ``duo_scaling``).
      measure: ``(grid, d_in)`` candidate scales -> ``(grid,)`` output errors, the caller's measure
        (e.g. the output of the module the kernels feed). None: the kernels' own output error from
        ``hessian``.
      path: layer name used in error messages.

    Returns:
      :class:`AWQScales`. Apply them with :func:`scale_input_channels` on every kernel and
      :func:`unscale_output_channels` on the op that produces their input.

    Raises:
      ValueError: naming ``path`` for a kernel that is not 2-d, mismatched shapes, NaN/Inf, a
        negative ``act_scale``, a spec layout the kernel does not fit, or no Hessian to read.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> x = jax.random.normal(jax.random.key(0), (256, 16)).at[:, 3].mul(40.0)  # one outlier channel
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> spec = QuantSpec(bits=3, granularity=PER_CHANNEL)
      >>> found = awq_scales(w, x.T @ x, spec, act_scale=jnp.abs(x).mean(0))
      >>> found.scales.shape, bool(found.errors.min() < found.errors[0])   # better than RTN (alpha 0)
      ((16,), True)
      >>> out = lambda s: jnp.stack([jnp.sum(((x / c) @ spec.fake_quant(w * c[:, None]) - x @ w) ** 2) for c in s])
      >>> bool(jnp.allclose(awq_scales(w, None, spec, act_scale=jnp.abs(x).mean(0), measure=out).errors,
      ...                   found.errors, rtol=1e-3))    # the caller's measure: here the same error
      True
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
    if hessian is None and (measure is None or act_scale is None):
        raise ValueError(f"{path}: AWQ needs the input Hessian unless both measure and act_scale are given")
    if hessian is not None and jnp.shape(hessian) != (d_in, d_in):
        raise ValueError(f"{path}: hessian has shape {jnp.shape(hessian)}, expected {(d_in, d_in)}")
    hessian = None if hessian is None else jnp.asarray(hessian, jnp.float32)
    if act_scale is None:
        assert hessian is not None  # checked above
        act = jnp.sqrt(jnp.maximum(jnp.diagonal(hessian), 0.0))
    else:
        act = jnp.asarray(act_scale)
    if act.shape != (d_in,):
        raise ValueError(f"{path}: act_scale has shape {act.shape}, expected {(d_in,)}")
    grid = _checks.integer(f"{path}: AWQ grid", grid, low=1)
    duo = _checks.flag(f"{path}: AWQ duo", duo)
    _checks.finite([(path, k) for k in group] + [(f"{path} act_scale", act)]
                   + ([] if hessian is None else [(f"{path} hessian", hessian)]), "AWQ inputs")
    if not _checks.is_traced(act) and bool(jnp.any(act < 0)):
        raise ValueError(f"{path}: act_scale must be >= 0 (a mean |x|), got min {float(act.min())}")
    group = [k.astype(jnp.float32) for k in group]
    candidates = _candidates(act.astype(jnp.float32), _weight_mean(tuple(group), spec) if duo else None, grid)
    errors = _hessian_errors(tuple(group), hessian, candidates, spec) if measure is None else measure(candidates)
    return _pick(candidates, jnp.asarray(errors, jnp.float32))


class AWQClip(NamedTuple):
    """What :func:`awq_clip` found.

    Attributes:
      kernel: the ``(d_in, d_out)`` kernel clipped to ``[-r m, r m]`` per group (``m`` its max ``|w|``).
      ratios: ``(n_groups, d_out)`` the chosen ratio ``r`` per input group and output channel.
      errors: ``(n_ratios, n_groups, d_out)`` output error ``d^T H_gg d`` of each candidate ratio
        ``1 - i / grid``; ``errors[0]`` is unclipped round to nearest.
    """

    kernel: jax.Array
    ratios: jax.Array
    errors: jax.Array


def _group_size(spec: _options.Format, d_in: int) -> int:
    """The input rows one scale covers: the spec's group, else the whole input axis."""
    granularity = getattr(spec, "granularity", None)
    return granularity.span(d_in) if isinstance(granularity, _options.Group) else d_in


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """``(d_in, ...)`` -> ``(n_groups, size, ...)``, a short last group padded with zeros."""
    pad = -x.shape[0] % size
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, size, *x.shape[1:])


def _clipped(kernel: jax.Array, peak: jax.Array, ratio: jax.Array, size: int) -> jax.Array:
    """``kernel`` clipped to ``[-ratio * peak, ratio * peak]`` per group (both ``(n_groups, d_out)``)."""
    bound = jnp.repeat(ratio * peak, size, axis=0)[: kernel.shape[0]]
    return jnp.clip(kernel, -bound, bound)


@functools.partial(jax.jit, static_argnames=("spec", "grid", "shrink"))
def _clip_search(kernel: jax.Array, hessian: jax.Array, spec: _options.Format, grid: int, shrink: int) -> AWQClip:
    size = _group_size(spec, kernel.shape[0])
    peak = jnp.abs(_blocks(kernel, size)).max(axis=1)
    n, pad = peak.shape[0], -kernel.shape[0] % size
    blocks = jnp.pad(hessian, [(0, pad), (0, pad)]).reshape(n, size, n, size)
    diagonal = jnp.moveaxis(jnp.diagonal(blocks, axis1=0, axis2=2), -1, 0)   # H_gg: (n, size, size)
    ratios = 1.0 - jnp.arange(shrink, dtype=jnp.float32) / grid

    def error(ratio):
        d = _blocks(spec.fake_quant(_clipped(kernel, peak, jnp.full_like(peak, ratio), size)) - kernel, size)
        return jnp.einsum("gio,gij,gjo->go", d, diagonal, d)

    errors = jax.lax.map(error, ratios)  # one candidate at a time
    best = ratios[jnp.argmin(jnp.where(jnp.isnan(errors), jnp.inf, errors), axis=0)]  # first minimum: least clipping
    return AWQClip(_clipped(kernel, peak, best, size), best, errors)


def awq_clip(kernel: jax.typing.ArrayLike, hessian: jax.typing.ArrayLike, spec: _options.Format, *, grid: int = 20,
             max_shrink: float = 0.5, path: str = "kernel") -> AWQClip:
    """Searches AWQ's clipping ratio per quantization group and output channel of one kernel.

    Each group of ``spec`` (``Group(size)`` along the input axis; the whole input axis for other
    granularities) of each output channel is clipped to ``r`` times its largest ``|w|``, for ``r`` in
    ``1, 1 - 1/grid, ...`` while ``1 - r < max_shrink``; the clipped kernel is quantized by the spec's
    own calibration, and each group keeps the ``r`` with the least error ``d^T H_gg d`` of its
    partial output (``d`` the group's weight error, ``H_gg`` its block of ``X^T X``).

    Args:
      kernel: ``(d_in, d_out)`` Dense kernel (after AWQ's scales, if any).
      hessian: ``(d_in, d_in)`` input Hessian ``X^T X`` of the inputs the kernel reads.
      spec: the weight format the kernel is quantized to afterwards.
      grid: the ratios' step is ``1 / grid``.
      max_shrink: in (0, 1]: the ratios stay above ``1 - max_shrink`` (the reference's 0.5: 10 of 20).
      path: layer name used in error messages.

    Returns:
      :class:`AWQClip`: the clipped float kernel (quantize it next), the ratios and the errors.

    Raises:
      ValueError: naming ``path`` for a kernel that is not 2-d, a mismatched Hessian, NaN/Inf, a bad
        ``grid`` / ``max_shrink``, or a spec layout the kernel does not fit.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, Group
      >>> w = jax.random.normal(jax.random.key(0), (64, 8)).at[5, 2].set(12.0)   # one outlier weight
      >>> x = jax.random.normal(jax.random.key(1), (256, 64))
      >>> found = awq_clip(w, x.T @ x, QuantSpec(bits=3, granularity=Group(32)))
      >>> found.ratios.shape, float(found.ratios[0, 2]) < 1.0    # the outlier's group is clipped
      ((2, 8), True)
    """
    if not isinstance(spec, _options.Format):
        raise TypeError(f"{path}: AWQ clipping needs a QuantSpec or Format, got {spec!r}")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{path}: AWQ clipping needs a 2-d kernel (d_in, d_out), got shape {tuple(kernel.shape)}")
    jax.eval_shape(functools.partial(spec.fake_quant, path=path), kernel)
    if jnp.shape(hessian) != (kernel.shape[0],) * 2:
        raise ValueError(f"{path}: hessian has shape {jnp.shape(hessian)}, expected {(kernel.shape[0],) * 2}")
    grid = _checks.integer(f"{path}: AWQ grid", grid, low=1)
    max_shrink = _checks.fraction(f"{path}: AWQ max_shrink", max_shrink, open_low=True, closed=True)
    hessian = jnp.asarray(hessian, jnp.float32)
    _checks.finite([(path, kernel), (f"{path} hessian", hessian)], "AWQ clipping inputs")
    shrink = max(1, math.ceil(max_shrink * grid - 1e-9))   # ratios 1 - i/grid, i < max_shrink * grid
    return _clip_search(kernel.astype(jnp.float32), hessian, spec, grid, shrink)

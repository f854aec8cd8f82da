"""Calibration: the scale (and zero point) of an integer grid from data, plus the grid arithmetic.

Scales keep ``x.ndim`` dimensions: size 1 along reduced axes, the channel count along the channel
axis and ``ceil(n / size)`` along a grouped axis, so they broadcast (after :func:`expand`) against ``x``
and shard like it. When ``size`` does not divide ``n`` the last group is shorter, as in GPTQ's
reference (an ``intermediate_size`` of 176 with ``Group(128)``: groups of 128 and 48).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_big import _checks
from jaxopt_big.quant import _options

__all__ = ["calibrate", "expand", "group_size"]


# Half a step (the farthest rounding moves a value) plus the float32 error of ``x / scale + zero_point``
# at codes up to 2^8: a value this close to the grid's ends rounds onto them, clip or not.
_ROUNDING = 0.5 + 2.0 ** -10


def _where(path: str) -> str:
    return f"{path}: " if path else ""


def check_input(x: jax.Array, path: str) -> jax.Array:
    """Floating dtype, not empty; no NaN or Inf when the value is concrete (see :func:`nan_where_nonfinite`)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{_where(path)}quantization needs a floating array, got dtype {x.dtype}")
    if not x.size:
        raise ValueError(f"{_where(path)}cannot quantize a zero-size array (shape {x.shape}); leave it out of where=")
    _checks.finite([(path, x)], "values to quantize")
    return x


def nan_where_nonfinite(scale: jax.Array, x: jax.Array, axes: tuple[int, ...] | None = None) -> jax.Array:
    """``scale`` set to NaN for every group of ``x`` (reduced over ``axes``; None: all) holding NaN or Inf.

    Only a traced ``x`` gets here with such values (concrete ones raise in :func:`check_input`). The
    poisoned group then quantizes to NaN, visibly, instead of to a silent 1.0 scale or to an infinite
    one, and every other group keeps the scale of its own finite values.
    """
    bad = jnp.any(~jnp.isfinite(x), axis=axes, keepdims=axes is not None)
    return jnp.where(bad, jnp.nan, scale)


def check_grid(scale: jax.typing.ArrayLike, zero_point: jax.typing.ArrayLike | None, path: str = ""
               ) -> tuple[jax.Array, jax.Array | None]:
    """A given scale (and zero point) as float32 arrays; concrete ones must be finite, the scale > 0.

    Traced values (learned or computed under ``jit``) cannot be inspected and pass unchecked.

    Examples:
      >>> check_grid(0.0, None, "d/kernel")
      Traceback (most recent call last):
      ...
      ValueError: d/kernel: scale must be finite and > 0, got 0.0
    """
    return (_grid_array("scale", scale, path, positive=True),
            None if zero_point is None else _grid_array("zero_point", zero_point, path, positive=False))


def _grid_array(name: str, value: jax.typing.ArrayLike, path: str, *, positive: bool) -> jax.Array:
    if not _checks.is_traced(value):
        host = np.asarray(value)
        if not (np.issubdtype(host.dtype, np.integer) or np.issubdtype(host.dtype, np.floating)):
            raise TypeError(f"{_where(path)}{name} must be a real number or array, got {value!r}")
        bad = ~np.isfinite(host) | ((host <= 0) if positive else False)
        if bad.any():
            shown = host.item() if host.ndim == 0 else f"{host[bad][0]} ({int(bad.sum())} of {host.size} values)"
            raise ValueError(f"{_where(path)}{name} must be finite{' and > 0' if positive else ''}, got {shown}")
    return jnp.asarray(value, jnp.float32)


def _axis(name: str, axis: int, ndim: int, path: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{_where(path)}{name}={axis} is out of range for a {ndim}-d array")
    return axis % ndim


def check_layout(shape: tuple[int, ...], spec: _options.IntegerGrid, path: str = "") -> tuple[int, int] | None:
    """``(axis, along)`` of a grouped ``spec`` on ``shape`` (None for other granularities), validated."""
    g = spec.granularity
    if isinstance(g, (_options.PerTensor, _options.PerToken)):
        return None
    axis = _axis("axis", spec.axis, len(shape), path)
    if isinstance(g, _options.PerChannel):
        return axis, axis
    along = _axis("Group.along", g.along, len(shape), path)
    if along == axis:
        raise ValueError(f"{_where(path)}Group.along={g.along} is the channel axis={spec.axis}")
    return axis, along


def group_size(shape: tuple[int, ...], spec: _options.IntegerGrid) -> int | None:
    """Entries per scale along the grouped axis of ``shape`` when the last group there is shorter,
    else None: groups that divide the axis are read off the scale's shape (``n // rows``) by
    :func:`expand`, in whatever layout the scale is given (a multi-axis kernel's included).

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, Group
      >>> spec = QuantSpec(granularity=Group(128))
      >>> group_size((176, 8), spec), group_size((256, 8), spec), group_size((64, 8), spec)
      (128, None, None)
    """
    g = spec.granularity
    if not isinstance(g, _options.Group):
        return None
    n = shape[g.along % len(shape)]
    size = g.span(n)
    return size if n % size else None


def _whole_groups(shape: tuple[int, ...], spec: _options.IntegerGrid) -> tuple[int, int] | None:
    """``(along, entries in whole groups)`` when the last group along ``along`` is shorter, else None."""
    size = group_size(shape, spec)
    if size is None:
        return None
    along = spec.granularity.along % len(shape)  # type: ignore[union-attr]  # grouped: size is not None
    return along, shape[along] // size * size


def blocked(x: jax.Array, spec: _options.IntegerGrid
            ) -> tuple[jax.Array, tuple[int, ...], Callable[[jax.Array], jax.Array]]:
    """``x`` laid out so one scale covers the reduced ``axes``; ``unblock`` maps a keepdims reduction back.

    A grouped ``x`` must hold whole groups (:func:`_integer_calibrate` splits off a shorter last one).
    """
    g = spec.granularity
    layout = check_layout(x.shape, spec)
    if isinstance(g, _options.PerTensor):
        return x, tuple(range(x.ndim)), lambda s: s
    if isinstance(g, _options.PerToken):
        return x, tuple(range(x.ndim))[-1:], lambda s: s
    assert layout is not None
    axis, along = layout
    if isinstance(g, _options.PerChannel):
        return x, tuple(d for d in range(x.ndim) if d != axis), lambda s: s
    n = x.shape[along]
    size = g.span(n)
    assert n % size == 0, (x.shape, g)
    xb = x.reshape(*x.shape[:along], n // size, size, *x.shape[along + 1:])
    keep = {along, axis + (axis > along)}
    return xb, tuple(d for d in range(xb.ndim) if d not in keep), lambda s: s.squeeze(along + 1)


def expand(scale: jax.Array, shape: tuple[int, ...], group: int | None = None) -> jax.Array:
    """Broadcastable form of a per-tensor/channel/group ``scale`` (or zero point) for ``shape``.

    ``group``: entries per scale along the grouped axis (see :func:`group_size`); needed only when the
    last group is shorter, else ``n / scale rows``.

    Examples:
      >>> expand(jnp.array([[1.0], [2.0]]), (4, 1)).ravel().tolist()
      [1.0, 1.0, 2.0, 2.0]
      >>> expand(jnp.array([[1.0], [2.0]]), (5, 1), group=3).ravel().tolist()
      [1.0, 1.0, 1.0, 2.0, 2.0]
    """
    for d, (s, n) in enumerate(zip(scale.shape, shape)):
        if s not in (1, n):  # a repeated axis keeps its mesh axes (explicit sharding must be told so)
            size = n // s if group is None else group
            if s != -(-n // size):
                raise ValueError(f"scale of shape {scale.shape} does not fit shape {tuple(shape)} with groups "
                                 f"of {size} along axis {d}")
            scale = jnp.repeat(scale, size, axis=d, total_repeat_length=n, out_sharding=_explicit_sharding(scale))
    return scale


def _explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    sharding = jax.typeof(x).sharding
    return sharding if any(a is not None for a in sharding.spec) else None


def to_int(x: jax.Array, spec: _options.IntegerGrid, scale: jax.Array, zero_point: jax.Array | None, *,
           clip: bool = True) -> jax.Array:
    """Integer grid values (as floats) of ``x``; scale/zero point already broadcastable.

    ``clip=False`` skips the clamp to ``[qmin, qmax]`` where the caller knows ``x`` is inside the range.
    """
    q = jnp.round(x / scale)
    if zero_point is not None:
        q = q + zero_point
    return jnp.clip(q, spec.qmin, spec.qmax) if clip else q


def unclipped(v: jax.Array, spec: _options.IntegerGrid) -> jax.Array:
    """Where grid values ``v = x / scale (+ zero_point)``, before rounding, are not clipped: the STE mask.

    Only values farther than rounding beyond ``[qmin, qmax]`` count as clipped. The ends of a range
    calibrated on the same values land on the grid's ends only up to float32 rounding (``absmax / 127``
    times 127 may fall one ulp short of ``absmax``) and, on affine grids, up to half a step (the zero
    point is rounded); they keep their gradient.
    """
    return jnp.abs(v - jnp.clip(v, spec.qmin, spec.qmax)) <= _ROUNDING


def from_int(q: jax.Array, scale: jax.Array, zero_point: jax.Array | None) -> jax.Array:
    return (q if zero_point is None else q - zero_point) * scale


def _positive(amax: jax.Array, scale: jax.Array) -> jax.Array:
    """``scale``, or 1 where the range is empty (an all-zero slice) so that nothing divides by zero."""
    return jnp.where(amax > jnp.finfo(jnp.float32).tiny, scale, 1.0)


def _from_range(lo: jax.Array, hi: jax.Array, spec: _options.IntegerGrid) -> tuple[jax.Array, jax.Array | None]:
    """The smallest grid holding ``[lo, hi]`` (``lo <= 0 <= hi``) without clipping."""
    if spec.symmetric:
        amax = jnp.maximum(-lo, hi)
        return _positive(amax, jnp.maximum(-lo / -spec.qmin, hi / spec.qmax)), None
    n = spec.qmax - spec.qmin
    scale = _positive(jnp.maximum(-lo, hi), hi / n - lo / n)  # not (hi - lo) / n: a finite width may overflow
    return scale, jnp.clip(jnp.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)


def _range(xb: jax.Array, axes: tuple[int, ...], spec: _options.IntegerGrid) -> tuple[jax.Array, jax.Array]:
    cal = spec.calibration
    if isinstance(cal, _options.Percentile):
        if spec.symmetric:
            amax = _percentile(jnp.abs(xb), cal.q, axes)
            return -amax, amax
        lo, hi = _percentile(xb, 100 - cal.q, axes), _percentile(xb, cal.q, axes)
        return jnp.minimum(lo, 0), jnp.maximum(hi, 0)
    # A narrow symmetric grid only reads max(-lo, hi): one reduction, not two (activations are
    # calibrated on every call). A full-range one puts each end at its own code.
    if (isinstance(cal, _options.AbsMax) and not spec.symmetric) or (spec.symmetric and not spec.full_range):
        amax = jnp.max(jnp.abs(xb), axis=axes, keepdims=True)
        return -amax, amax
    return (jnp.minimum(jnp.min(xb, axis=axes, keepdims=True), 0),
            jnp.maximum(jnp.max(xb, axis=axes, keepdims=True), 0))


def _percentile(x: jax.Array, q: float, axes: tuple[int, ...]) -> jax.Array:
    """``jnp.percentile`` over ``axes`` (keepdims).

    A sort cannot split the axis it sorts, so an explicitly sharded ``x`` is gathered along ``axes``
    only (the kept axes stay sharded, as the scale is), and they are merged into one last axis.
    """
    sharding = _explicit_sharding(x)
    if sharding is None:
        return jnp.percentile(x, q, axis=axes, keepdims=True)
    keep = [d for d in range(x.ndim) if d not in axes]
    x = jax.sharding.reshard(x, sharding.update(spec=jax.P(*(None if d in axes else a
                                                                for d, a in enumerate(sharding.spec)))))
    x = jnp.transpose(x, keep + list(axes))
    return jnp.expand_dims(jnp.percentile(x.reshape(*x.shape[:len(keep)], -1), q, axis=-1), axes)


def _mse_grids(spec: _options.IntegerGrid, lo: jax.Array, hi: jax.Array) -> list[Callable]:
    """The grids the MSE search tries, as functions of the clipping ratio ``r`` -> (scale, zero point).

    Symmetric: ``r * absmax`` at the code ``qmax`` and, with all ``2^b`` codes, also at ``-qmin``
    (int2: ``absmax`` at 1 or at -2). Affine: the ``r``-shrunk ``[lo, hi]`` range and, with zero point
    0, every symmetric candidate, so an affine search is never worse than a symmetric one.
    """
    amax = jnp.maximum(-lo, hi)
    zero = None if spec.symmetric else jnp.zeros_like(amax)
    ends = (spec.qmax, -spec.qmin) if spec.full_range else (spec.qmax,)
    symmetric = [lambda r, n=n: (_positive(amax, r * amax / n), zero) for n in ends]
    return symmetric if spec.symmetric else [lambda r: _from_range(lo * r, hi * r, spec), *symmetric]


def _mse_search(xb, axes, spec, lo, hi):
    cal = spec.calibration
    ratios = jnp.linspace(cal.min_ratio, 1.0, cal.steps)
    grids = _mse_grids(spec, lo, hi)
    amax = jnp.maximum(-lo, hi)
    unit = _positive(amax, amax)  # errors in units of absmax: squares of huge (or tiny) finite values stay finite

    def keep_better(best, grid):
        scale, zp = grid
        diff = (from_int(to_int(xb, spec, scale, zp), scale, zp) - xb) / unit
        err = jnp.sum(jnp.square(diff), axis=axes, keepdims=True)
        better = err < best[0]
        return tuple(None if old is None else jnp.where(better, new, old) for new, old in zip((err, scale, zp), best))

    def body(i, best):  # from the widest range down: ties keep the wider range
        for grid in grids:
            best = keep_better(best, grid(ratios[cal.steps - 1 - i]))
        return best

    start = (jnp.full(lo.shape, jnp.inf), jnp.ones(lo.shape), None if spec.symmetric else jnp.zeros(lo.shape))
    return jax.lax.fori_loop(0, cal.steps, body, start)[1:]


def integer_calibrate(x, spec: _options.IntegerGrid, *, path: str = ""):
    return calibrate_checked(check_input(x, path), spec, path)


def calibrate_checked(x: jax.Array, spec: _options.IntegerGrid, path: str = ""):
    """:func:`integer_calibrate` of an ``x`` that already passed :func:`check_input`."""
    check_layout(x.shape, spec, path)
    return _integer_calibrate(x, spec)


# One program per (shape, spec): called eagerly (quantize_params, calibrate), op-by-op dispatch
# compiled each of its ops on its own for every new shape. The path-naming checks run before.
@functools.partial(jax.jit, static_argnums=1)
def _integer_calibrate(x: jax.Array, spec: _options.IntegerGrid):
    split = _whole_groups(x.shape, spec)
    if split is not None:  # the whole groups, then the shorter last one, each calibrated on its own values
        along, whole = split
        parts = [_integer_calibrate(part, spec) for part in jnp.split(x, [whole], axis=along)]
        return tuple(None if p[0] is None else jnp.concatenate(p, axis=along) for p in zip(*parts))
    xb, axes, unblock = blocked(x.astype(jnp.float32), spec)
    lo, hi = _range(xb, axes, spec)
    if isinstance(spec.calibration, _options.MSE):
        scale, zp = _mse_search(xb, axes, spec, lo, hi)
    else:
        scale, zp = _from_range(lo, hi, spec)
    if isinstance(spec.calibration, _options.Percentile):
        scale = nan_where_nonfinite(scale, xb, axes)
    else:  # a max or min over a group is NaN or infinite exactly when the group holds NaN or Inf
        scale = jnp.where(jnp.isfinite(lo) & jnp.isfinite(hi), scale, jnp.nan)
    zp = None if zp is None else jnp.where(jnp.isnan(scale), jnp.nan, zp)
    return unblock(rounded_scale(scale, spec)), None if zp is None else unblock(zp)


def rounded_scale(scale: jax.Array, spec: _options.IntegerGrid) -> jax.Array:
    """``scale`` rounded to ``spec.scale_dtype`` (if set), kept inside its positive finite range.

    Rounding moves a scale by at most 2^-9 of itself (bfloat16), so ``qmax * scale`` still rounds to
    ``qmax``: no value that fitted the grid is clipped.
    """
    dtype = getattr(spec, "scale_dtype", None)
    if dtype is None:
        return scale
    info = jnp.finfo(dtype)
    return jnp.clip(scale, info.smallest_subnormal, info.max).astype(dtype).astype(jnp.float32)


def calibrate(x: jax.typing.ArrayLike, spec: _options.Format, *, path: str = "") -> tuple[jax.Array, jax.Array | None]:
    """Scale and zero point (None when symmetric) of ``spec``'s grid for the data ``x``.

    Args:
      x: floating array (a weight, or activations stacked over calibration batches).
      spec: a :class:`QuantSpec` or any :class:`Format`.
      path: leaf path used in error messages.

    Non-finite values: a concrete ``x`` with NaN or Inf raises; under a trace, every scale group
    (tensor, channel or group) holding NaN or Inf gets a NaN scale (and zero point), so it
    quantizes to NaN, while the other groups are calibrated from their own values as usual.

    Raises:
      ValueError: NaN or Inf in concrete ``x``; an empty ``x``; a group size that does not divide its axis; a bad axis.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> scale, zp = calibrate(jnp.array([[1.0, -2.0], [0.5, 4.0]]), QuantSpec(granularity=PER_CHANNEL))
      >>> (scale * 127).tolist(), zp
      ([[1.0, 4.0]], None)
    """
    if not isinstance(spec, _options.Format):
        raise TypeError(f"{_where(path)}expected a QuantSpec or Format, got {spec!r}")
    return spec.calibrate(x, path=path)

"""GPTQ: one-shot weight quantization that corrects rounding error with the input Hessian.

Inputs (rows of a Dense kernel ``(d_in, d_out)``) are quantized one at a time; each one's rounding
error is spread over the not-yet-quantized inputs through the inverse Hessian ``(X^T X + λI)^-1``
(Frantar et al., 2023). Updates to later blocks of ``block_size`` inputs are applied lazily, once
per block. With ``Group(size)`` granularity each group's scale is set from the (already updated)
weights when the group is reached (a size that does not divide the inputs leaves a shorter last
group, as in the reference); with ``act_order`` inputs are visited by decreasing Hessian
diagonal and group scales are fixed up front from the original weights ("static groups"), so the
groups stay contiguous and the result is an ordinary :class:`~jaxopt_big.quant.QArray`.

Scales come from the spec's own calibration (``MSE()``: the same grid search as round-to-nearest,
as the reference's ``find_params(mse=True)``), and an output feature where round-to-nearest on that
grid has less output error on the calibration inputs keeps the rounded weights: per layer, GPTQ is
never worse than RTN with the same spec.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxopt_big import _checks
from jaxopt_big import _deprecation
from jaxopt_big import calibration as _calibration
from jaxopt_big.quant import _spec

__all__ = ["gptq_params", "gptq_kernel", "gptq"]


@functools.partial(jax.jit, static_argnames=("spec", "group", "dynamic", "feedback"))
def _gptq_block(w1, hinv1, scale, zero, groups, pruned1, spec, group, dynamic, feedback):
    """One block of inputs of ``W`` (rows = outputs). ``groups[i]``: scale row of block column i;
    ``pruned1``: weights that stay zero (their rounding error is their whole value). Only the first
    ``feedback`` rows spread their rounding error; the others are just rounded. Blocks start at a
    group boundary; the last block may end with a shorter group."""
    rows, cols = w1.shape
    short = cols % group  # width of a shorter last group, 0 if none

    def body(i, carry):
        w1, err1, scale, zero = carry
        g = groups[i]
        if dynamic:  # a group starts here: its scale comes from the updated weights (only then: MSE is costly)
            def recalibrate(width):
                def set_row(scale, zero):
                    s, z = spec.calibrate(jax.lax.dynamic_slice(w1, (0, i), (rows, width)).T)
                    return scale.at[g].set(s[0]), None if zero is None else zero.at[g].set(z[0])
                return set_row

            # branch 0 keeps the scales; the others start a whole group, or the shorter last one
            widths = ([group] if cols >= group else []) + ([short] if short else [])
            last = jnp.where(i == cols - short, len(widths), 1) if short else 1
            branch = jnp.where(i % group == 0, last, 0)
            branches = [lambda s, z: (s, z)] + [recalibrate(width) for width in widths]
            scale, zero = jax.lax.switch(branch, branches, scale, zero)
        w = w1[:, i]
        q = spec.fake_quant(w[None, :], scale[g][None], None if zero is None else zero[g][None])[0]
        q = jnp.where(pruned1[:, i], 0.0, q)
        err = jnp.where(jnp.arange(rows) < feedback, (w - q) / hinv1[i, i], 0.0)
        w1 = w1 - err[:, None] * hinv1[i][None, :]  # upper triangular: columns >= i; column i becomes q
        return w1.at[:, i].set(q), err1.at[:, i].set(err), scale, zero

    return jax.lax.fori_loop(0, cols, body, (w1, jnp.zeros_like(w1), scale, zero))


def _full_blocks(w, hinv, scale, zero, groups, pruned, spec, group, dynamic, block_size, feedback):
    """The whole blocks of ``block_size`` inputs, in a loop (one block traced and compiled, whatever the
    layer's width: a Python loop made compile time grow with it). The lazy update of the later inputs
    multiplies by the block's rows of ``hinv`` with the earlier columns masked out: ``hinv`` is upper
    triangular, so the rows' own columns are the only others touched, and they are then set to the
    block's quantized values. Only the first ``feedback`` rows are updated (see :func:`_gptq_block`)."""
    d_in = w.shape[1]
    if d_in < block_size:
        return w, scale, zero
    later = jnp.arange(d_in)

    def body(b, carry):
        w, scale, zero = carry
        i1 = b * block_size
        cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i1, block_size, axis)  # noqa: E731
        q1, err1, scale, zero = _gptq_block(cut(w, 1), cut(cut(hinv, 0), 1), scale, zero, cut(groups, 0),
                                            cut(pruned, 1), spec, group, dynamic, feedback)
        w = w.at[:feedback].add(-(err1[:feedback] @ jnp.where(later[None, :] >= i1 + block_size, cut(hinv, 0), 0.0)))
        return jax.lax.dynamic_update_slice_in_dim(w, q1, i1, 1), scale, zero

    return jax.lax.fori_loop(0, d_in // block_size, body, (w, scale, zero))


def _granularity(spec: _spec.QuantSpec, d_in: int, path: str) -> int | None:
    """Group size (None: one scale row for all inputs); checks the layout GPTQ needs."""
    g = spec.granularity
    if isinstance(g, _spec.PerTensor):
        return None
    if spec.axis not in (-1, 1):
        raise ValueError(f"{path}: GPTQ needs scales per output feature (axis=-1), got axis={spec.axis}")
    if isinstance(g, _spec.PerChannel):
        return None
    if not isinstance(g, _spec.Group):  # PerToken scales activations, not a weight's grid
        raise ValueError(f"{path}: GPTQ needs per-tensor, per-channel or group scales, got {g!r}")
    if g.along not in (-2, 0):
        raise ValueError(f"{path}: GPTQ groups run along the input axis (along=-2), got along={g.along}")
    return g.span(d_in)  # a shorter last group when it does not divide d_in


def gptq_kernel(kernel: jax.typing.ArrayLike, hessian: jax.typing.ArrayLike, spec: _spec.QuantSpec, *,
                block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                pruned: jax.typing.ArrayLike | None = None, path: str = "kernel") -> Any:
    """GPTQ-quantizes a Dense kernel ``(d_in, d_out)`` into a ``QArray`` on ``spec``'s grid.

    Args:
      kernel: the kernel.
      hessian: ``(d_in, d_in)`` input Hessian ``X^T X`` (``LayerStats.hessian``).
      spec: a ``QuantSpec`` with ``PER_TENSOR``, ``PER_CHANNEL`` or ``Group(size)`` granularity
        (``axis=-1``: scales per output feature; groups along the input axis).
      block_size: inputs per lazy-update block; rounded up to a multiple of the group size.
      damp: diagonal damping as a fraction of the mean Hessian diagonal.
      act_order: visit inputs by decreasing Hessian diagonal (static group scales).
      pruned: optional ``(d_in, d_out)`` bool mask of weights that stay exactly zero (prune, then
        quantize the survivors, as in SparseGPT's joint mode).
      path: name used in error messages.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, PER_CHANNEL
      >>> mix = jnp.eye(16) + 0.5 * jax.random.normal(jax.random.key(2), (16, 16))  # correlated inputs
      >>> x = jax.random.normal(jax.random.key(0), (256, 16)) @ mix
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> spec = QuantSpec(bits=3, symmetric=False, granularity=PER_CHANNEL)
      >>> q = gptq_kernel(w, x.T @ x, spec)
      >>> err = lambda k: float(jnp.sum((x @ k - x @ w) ** 2))
      >>> err(q.dense()) < err(spec.fake_quant(w))   # beats round-to-nearest on the data
      True
    """
    if not isinstance(spec, _spec.QuantSpec):
        raise TypeError(f"{path}: gptq needs a QuantSpec (integer grid), got {spec!r}")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{path}: GPTQ needs a 2-d Dense kernel, got shape {kernel.shape}")
    d_in, d_out = kernel.shape
    if jnp.shape(hessian) != (d_in, d_in):
        raise ValueError(f"{path}: hessian has shape {jnp.shape(hessian)}, expected {(d_in, d_in)}")
    block_size = _checks.integer(f"{path}: block_size", block_size, low=1)
    _checks.finite([(path, kernel), (f"{path} hessian", hessian)], "GPTQ inputs")
    group = _granularity(spec, d_in, path)
    if group is not None:
        block_size = -(-block_size // group) * group
    if pruned is not None and jnp.shape(pruned) != (d_in, d_out):
        raise ValueError(f"{path}: pruned mask has shape {jnp.shape(pruned)}, expected {(d_in, d_out)}")
    hessian = jnp.asarray(hessian, jnp.float32)
    # act_order's visiting order; in input order nothing is gathered, so the inverse below is the very
    # expression of the method's well-posedness check and XLA computes it once for both
    perm = jnp.argsort(-jnp.diagonal(hessian), stable=True) if act_order else None
    visit = (lambda x: x) if perm is None else (lambda x: x[..., perm])  # noqa: E731
    hinv, dead = _calibration.inverse_hessian(hessian if perm is None else visit(hessian)[perm], damp=damp)
    # round-to-nearest rides along as d_out more rows, the original weights: calibrated and rounded
    # by the same code on the same grid, but with no error feedback. Times sign(U[0, 0]) (1, or NaN
    # where the factorization failed): laid out after the inverse, not held beside its two buffers
    # (XLA's CPU scheduler runs what depends only on the arguments first)
    x = visit(kernel.T.astype(jnp.float32)) * jnp.sign(hinv[0, 0])
    w = jnp.concatenate([jnp.where(dead[None, :], 0.0, x), x])
    pruned = jnp.zeros_like(w, bool) if pruned is None else jnp.concatenate(
        [visit(jnp.asarray(pruned, bool).T), jnp.zeros_like(x, bool)])
    dynamic = group is not None and not act_order
    if group is not None and dynamic:  # filled group by group from the updated weights
        scale = jnp.ones((-(-d_in // group), 2 * d_out), jnp.float32)
        zero = None if spec.symmetric else jnp.zeros_like(scale)
    else:
        scale, zero = spec.calibrate(kernel.astype(jnp.float32), path=path)
        twice = lambda z: jnp.tile(jnp.broadcast_to(z, (z.shape[0], d_out)), 2)  # noqa: E731 - GPTQ's and RTN's rows
        scale, zero = twice(scale), None if zero is None else twice(zero)
    groups = visit(jnp.arange(d_in)) // group if group is not None else jnp.zeros(d_in, jnp.int32)
    w, scale, zero = _full_blocks(w, hinv, scale, zero, groups, pruned, spec, group or 1, dynamic, block_size, d_out)
    for i1 in range(d_in - d_in % block_size, d_in, block_size):  # a shorter last block, if any
        i2 = min(i1 + block_size, d_in)
        q1, err1, scale, zero = _gptq_block(w[:, i1:i2], hinv[i1:i2, i1:i2], scale, zero, groups[i1:i2],
                                            pruned[:, i1:i2], spec, group or 1, dynamic, d_out)
        w = w.at[:, i1:i2].set(q1).at[:d_out, i2:].add(-(err1[:d_out] @ hinv[i1:i2, i2:]))
    q = (w if perm is None else jnp.zeros_like(w).at[:, perm].set(w)).T  # in input order, (d_in, 2 d_out)
    halves = lambda a: None if a is None else (a[:, :d_out], a[:, d_out:])  # noqa: E731 - (GPTQ, round-to-nearest)
    return _no_worse_than_rtn(kernel, hessian, halves(q), halves(scale), halves(zero), spec, path)


def _no_worse_than_rtn(kernel, hessian, q, scale, zero, spec, path):
    """Per output feature, GPTQ's codes and scales unless round-to-nearest on the spec's own grid
    (same calibration) has less output error ``d^T H d`` on the calibration inputs. ``q``, ``scale``
    and ``zero`` (None when symmetric) are pairs: (GPTQ's, round-to-nearest's).

    GPTQ is greedy, so on a rare feature (e.g. a clipped MSE grid at 3 bits) rounding can win; output
    features are independent in this error and have their own scales, so each keeps the better one.
    """
    x = kernel.astype(jnp.float32)

    def output_error(k):
        d = k - x
        return jnp.sum(d * (hessian @ d), axis=0)

    keep = output_error(q[0]) <= output_error(q[1])
    pick = lambda ours, rtn: jnp.where(keep, ours, rtn)  # noqa: E731 - broadcasts over the input axis
    return spec.quantize(pick(q[0], x).astype(kernel.dtype), pick(*scale), None if zero is None else pick(*zero),
                         path=path)


def gptq_params(params: Any, hessians: Mapping[str, jax.typing.ArrayLike], spec: _spec.QuantSpec, *,
         block_size: int = 128, damp: float = 0.01, act_order: bool = False) -> Any:
    """GPTQ-quantizes the kernel of every layer named in ``hessians`` into ``QArray`` leaves.

    For the sequential variant (later layers calibrated on the quantized earlier ones) pass
    :func:`gptq_kernel` to :func:`jaxopt_big.calibration.sequential` instead.

    Args:
      params: parameters (linen ``params`` collection or full variables).
      hessians: ``{module path: (d_in, d_in) X^T X}``, e.g. ``{p: s.hessian for p, s in stats.items()}``.
      spec: as in :func:`gptq_kernel`, or ``[jb.tree.Rule(regex, spec), ...]`` among the named
        layers' kernels (first match wins; unclaimed kernels stay dense; see :mod:`jaxopt_big.tree`).
      block_size, damp, act_order: as in :func:`gptq_kernel`.

    Examples:
      >>> from jaxopt_big.quant._spec import QuantSpec, Group
      >>> x = jax.random.normal(jax.random.key(0), (32, 8))
      >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(1), (8, 4))}}
      >>> out = gptq_params(params, {"Dense_0": x.T @ x}, QuantSpec(bits=4, granularity=Group(4)))
      >>> out["Dense_0"]["kernel"].kind, out["Dense_0"]["kernel"].scale.shape
      ('int4', (2, 4))
    """
    return _calibration.map_kernels(lambda p, k, h, s: gptq_kernel(k, h, s, block_size=block_size, damp=damp,
                                                                   act_order=act_order, path=p),
                                    params, hessians, spec, what="spec")


gptq = _deprecation.alias(gptq_params, "jb.quant.gptq", "jb.quant.gptq_params")
